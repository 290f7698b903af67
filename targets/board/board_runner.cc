// board_runner: run a compiled model.so on a board without Python.
//
//   board_runner MODEL.so IMAGES.npy [--batch N] [--logits OUT.npy]
//
// IMAGES.npy: float32, N x 3 x 32 x 32, already normalized as the artifact's manifest says (little-endian,
// C order). Prints one line per image: its index, top-1 class and the logits; --logits also writes them as
// an N x 10 float32 .npy. Uses only TVM-FFI's C ABI (tvm_ffi/c_api.h) against libtvm_ffi.so + libtvm_runtime.so
// (the runtime of TVM 0.27, e.g. from the aarch64 wheel apache-tvm 0.27.0.post1), so no C++ types cross the
// library boundary: the program can be linked with any C++ runtime (zig's libc++ here).
// Build: targets/board_runner.py (zig c++ -target aarch64-linux-gnu.2.27). CPU models only (device cpu:0).
#include <tvm/ffi/c_api.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

[[noreturn]] void Fail(const std::string& msg) {
  std::fprintf(stderr, "error: %s\n", msg.c_str());
  std::exit(3);
}

std::string RaisedMessage() {
  TVMFFIObjectHandle err = nullptr;
  TVMFFIErrorMoveFromRaised(&err);
  if (err == nullptr) return "unknown error";
  TVMFFIErrorCell* cell = TVMFFIErrorGetCellPtr(err);
  std::string out = std::string(cell->kind.data, cell->kind.size) + ": " +
                    std::string(cell->message.data, cell->message.size);
  TVMFFIObjectDecRef(err);
  for (char& c : out)
    if (c == '\n') c = ' ';
  return out;
}

TVMFFIAny None() {
  TVMFFIAny a;
  std::memset(&a, 0, sizeof(a));
  a.type_index = kTVMFFINone;
  return a;
}

TVMFFIAny Int(int64_t v) {
  TVMFFIAny a = None();
  a.type_index = kTVMFFIInt;
  a.v_int64 = v;
  return a;
}

TVMFFIAny Str(const char* s) {
  TVMFFIAny a = None();
  a.type_index = kTVMFFIRawStr;
  a.v_c_str = s;
  return a;
}

TVMFFIAny Obj(TVMFFIObjectHandle h, int32_t type_index) {
  TVMFFIAny a = None();
  a.type_index = type_index;
  a.v_obj = static_cast<TVMFFIObject*>(h);
  return a;
}

TVMFFIAny Call(TVMFFIObjectHandle f, std::vector<TVMFFIAny> args, const std::string& what) {
  TVMFFIAny result = None();
  if (TVMFFIFunctionCall(f, args.data(), static_cast<int32_t>(args.size()), &result) != 0)
    Fail(what + ": " + RaisedMessage());
  return result;
}

TVMFFIObjectHandle Global(const char* name) {
  TVMFFIByteArray n{name, std::strlen(name)};
  TVMFFIObjectHandle f = nullptr;
  if (TVMFFIFunctionGetGlobal(&n, &f) != 0 || f == nullptr)
    Fail(std::string("the TVM runtime has no global function ") + name);
  return f;
}

TVMFFIObjectHandle GetFunction(TVMFFIObjectHandle mod, const char* name) {
  static TVMFFIObjectHandle get = Global("ffi.ModuleGetFunction");
  TVMFFIAny r = Call(get, {Obj(mod, kTVMFFIModule), Str(name), Int(1)}, std::string("looking up ") + name);
  if (r.type_index != kTVMFFIFunction) Fail(std::string("the module has no function ") + name);
  return r.v_obj;
}

// a minimal .npy reader/writer: float32, little-endian, C order
std::vector<float> ReadNpy(const char* path, std::vector<int64_t>* shape) {
  FILE* f = std::fopen(path, "rb");
  if (!f) Fail(std::string("cannot open ") + path);
  char magic[8];
  if (std::fread(magic, 1, 8, f) != 8 || std::memcmp(magic, "\x93NUMPY", 6) != 0)
    Fail(std::string(path) + " is not a .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t h = 0;
    if (std::fread(&h, 2, 1, f) != 1) Fail("truncated .npy header");
    header_len = h;
  } else {
    if (std::fread(&header_len, 4, 1, f) != 1) Fail("truncated .npy header");
  }
  std::string header(header_len, '\0');
  if (std::fread(&header[0], 1, header_len, f) != header_len) Fail("truncated .npy header");
  if (header.find("'<f4'") == std::string::npos || header.find("'fortran_order': False") == std::string::npos)
    Fail(std::string(path) + ": needs float32 ('<f4') in C order, got " + header);
  size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  std::string dims = header.substr(open + 1, close - open - 1);
  int64_t count = 1;
  for (size_t i = 0; i < dims.size();) {
    size_t j = dims.find(',', i);
    std::string d = dims.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (d.find_first_of("0123456789") != std::string::npos) {
      shape->push_back(std::atoll(d.c_str()));
      count *= shape->back();
    }
    if (j == std::string::npos) break;
    i = j + 1;
  }
  std::vector<float> data(static_cast<size_t>(count));
  if (std::fread(data.data(), sizeof(float), data.size(), f) != data.size()) Fail("truncated .npy data");
  std::fclose(f);
  return data;
}

void WriteNpy(const char* path, const std::vector<float>& data, int64_t rows, int64_t cols) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + std::to_string(rows) + ", " +
                       std::to_string(cols) + "), }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  FILE* f = std::fopen(path, "wb");
  if (!f) Fail(std::string("cannot write ") + path);
  std::fwrite("\x93NUMPY\x01\x00", 1, 8, f);
  uint16_t len = static_cast<uint16_t>(header.size());
  std::fwrite(&len, 2, 1, f);
  std::fwrite(header.data(), 1, header.size(), f);
  std::fwrite(data.data(), sizeof(float), data.size(), f);
  std::fclose(f);
}

void NoDelete(DLManagedTensor*) {}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.so IMAGES.npy [--batch N] [--logits OUT.npy]\n", argv[0]);
    return 2;
  }
  const char* model = argv[1];
  const char* images = argv[2];
  int64_t batch = 1;
  const char* logits_path = nullptr;
  for (int i = 3; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--batch")) batch = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--logits")) logits_path = argv[i + 1];
    else Fail(std::string("unknown option ") + argv[i]);
  }
  std::vector<int64_t> shape;
  std::vector<float> x = ReadNpy(images, &shape);
  if (shape.size() != 4 || shape[1] != 3 || shape[2] != 32 || shape[3] != 32)
    Fail("IMAGES.npy must be N x 3 x 32 x 32 float32");
  const int64_t n = shape[0], per_image = 3 * 32 * 32;

  TVMFFIAny lib = Call(Global("ffi.ModuleLoadFromFile"), {Str(model)}, std::string("loading ") + model);
  TVMFFIAny exec = Call(GetFunction(lib.v_obj, "vm_load_executable"), {}, "vm_load_executable");
  // device cpu:0 (kDLCPU = 1) with the pooled allocator (2), as tvm.runtime.vm.VirtualMachine does
  Call(GetFunction(exec.v_obj, "vm_initialization"), {Int(kDLCPU), Int(0), Int(2)}, "vm_initialization");
  TVMFFIObjectHandle main_fn = GetFunction(exec.v_obj, "main");

  std::vector<float> chunk(static_cast<size_t>(batch * per_image));
  std::vector<float> all_logits;
  int64_t classes = 0;
  for (int64_t start = 0; start < n; start += batch) {
    int64_t m = std::min(batch, n - start);
    std::fill(chunk.begin(), chunk.end(), 0.0f);
    std::memcpy(chunk.data(), x.data() + start * per_image, sizeof(float) * m * per_image);
    int64_t in_shape[4] = {batch, 3, 32, 32};
    DLManagedTensor managed;
    std::memset(&managed, 0, sizeof(managed));
    managed.dl_tensor.data = chunk.data();
    managed.dl_tensor.device = DLDevice{kDLCPU, 0};
    managed.dl_tensor.ndim = 4;
    managed.dl_tensor.dtype = DLDataType{kDLFloat, 32, 1};
    managed.dl_tensor.shape = in_shape;
    managed.deleter = NoDelete;
    TVMFFIObjectHandle input = nullptr;
    if (TVMFFITensorFromDLPack(&managed, 0, 1, &input) != 0) Fail("wrapping the input: " + RaisedMessage());
    TVMFFIAny out = Call(main_fn, {Obj(input, kTVMFFITensor)}, "running main");
    if (out.type_index != kTVMFFITensor) Fail("main did not return a tensor");
    DLTensor* t = TVMFFITensorGetDLTensorPtr(out.v_obj);
    if (t->ndim != 2 || t->dtype.code != kDLFloat || t->dtype.bits != 32) Fail("unexpected output tensor");
    classes = t->shape[1];
    const float* y = reinterpret_cast<const float*>(static_cast<char*>(t->data) + t->byte_offset);
    for (int64_t i = 0; i < m; ++i) {
      int64_t best = 0;
      std::printf("%lld", static_cast<long long>(start + i));
      for (int64_t c = 0; c < classes; ++c) {
        float v = y[i * classes + c];
        all_logits.push_back(v);
        if (v > y[i * classes + best]) best = c;
      }
      std::printf(" top1 %lld logits", static_cast<long long>(best));
      for (int64_t c = 0; c < classes; ++c) std::printf(" %.6g", y[i * classes + c]);
      std::printf("\n");
    }
    TVMFFIObjectDecRef(out.v_obj);
    TVMFFIObjectDecRef(input);
  }
  if (logits_path) WriteNpy(logits_path, all_logits, n, classes);
  std::fflush(stdout);
  return 0;
}
