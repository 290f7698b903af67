"""The public Python API: the README's example runs as written, settings are checked once, and the package
import stays light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_example_runs_as_written(shared_data, shared_resnet56, tmp_path):
    (tmp_path / "shared").symlink_to(SHARED)  # the example's "../shared/..." from a folder beside it
    work = tmp_path / "work"
    work.mkdir()
    r = subprocess.run([sys.executable, "-c", readme_example()], cwd=work, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)}, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("resnet56 0.5") and lines[1].startswith("int8 ")
    assert (work / "r56-p50-int8" / "manifest.json").is_file()


def test_import_is_light():
    code = "import sys, compiler; assert 'torch' not in sys.modules and 'tvm' not in sys.modules; " \
           "assert callable(compiler.build) and callable(compiler.prune) and compiler.Artifact.load"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_verbs_keep_their_names_beside_their_modules():
    import compiler
    from compiler.build import lower  # noqa: F401 - the module, by its full name
    import compiler.compare  # noqa: F401
    import compiler.prune.job  # noqa: F401
    import compiler.tuning.session  # noqa: F401 - tune's package has its own name

    assert callable(compiler.build) and callable(compiler.tune) and callable(compiler.prune)
    assert callable(compiler.compare) and compiler.tune is compiler.api.tune
    from compiler import build

    assert build is compiler.api.build


def test_settings_are_checked_once_with_the_keyword_named(tmp_path):
    import compiler
    from compiler.build import BuildSettings
    from compiler.prune.job import PruneSettings

    with pytest.raises(compiler.SettingError, match=r"^batch must be between 1 and"):
        BuildSettings(target="host", batch=0)
    with pytest.raises(compiler.SettingError, match=r"^flops_reduction must be a fraction"):
        PruneSettings(flops_reduction=1.5, out=tmp_path / "p.pt")
    e = compiler.SettingError("flops_reduction", "must be a fraction in (0, 1)")
    assert e.as_flag() == "--flops-reduction must be a fraction in (0, 1)"


def test_build_and_run_an_artifact(tmp_path, tiny_cifar):
    """compiler.build -> Artifact; Artifact.load(dir).run(uint8 images) equals PyTorch on the same images."""
    import numpy as np
    import torch

    import compiler
    from compiler import data
    from helpers import saved_resnet8

    model, path = saved_resnet8(tmp_path)
    art = compiler.build(path, target="host", precision="fp32", data=tiny_cifar, out=tmp_path / "art")
    assert art.manifest["precision"] == "fp32" and art.batch == 1
    images = np.load(tiny_cifar / "cifar10_test.npz")["x"][:3]  # uint8 NHWC
    logits = compiler.Artifact.load(tmp_path / "art").run(images)
    with torch.inference_mode():
        ref = model(data.normalize(torch.from_numpy(images).permute(0, 3, 1, 2), "cifar")).numpy()
    assert logits.shape == (3, 10) and np.abs(logits - ref).max() < 1e-3
    ev = compiler.evaluate(art, tiny_cifar, limit=8)
    assert ev["n"] == 8 and ev["precision"] == "fp32"
    # the same images through PyTorch: the fp32 artifact's argmax is PyTorch's, so the top-1 is the same
    assert compiler.evaluate(path, tiny_cifar, limit=8)["top1"] == ev["top1"]
    assert Path(art.folder).name == "art"


def test_no_module_imports_a_verb_module_by_its_short_name():
    """``from compiler import compare`` gives the API function, not compiler/compare.py: inside the package the
    verb modules are imported by their full names."""
    verbs = r"\b(build|compare|evaluate|prune|tune)\b"
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "compiler").rglob("*.py") if p.name != "api.py"
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.match(r"\s*from compiler import ", line) and re.search(verbs, line.split("import", 1)[1])]
    assert not bad, bad
