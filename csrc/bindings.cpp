// fastjepa._C: the csrc/ kernels for Python. Tensors arrive as raw device addresses (ints),
// dtypes as names ("float32", "bfloat16", "float16", "int32", "int64") and the stream as
// the integer handle of torch.cuda.current_stream().cuda_stream, so the module does not
// depend on PyTorch's C++ ABI. Every argument is checked here, before any CUDA call: a bad
// one raises TypeError (dtypes) or ValueError (sizes, list lengths, addresses). A CUDA error
// at launch raises RuntimeError naming the kernel.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;
using fastjepa::DType;
using Addresses = std::vector<uintptr_t>;

namespace {

template <typename... Parts>
std::string str(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

size_t dtype_size(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::BFloat16: return "bfloat16";
    case DType::Float16: return "float16";
    default: return "float32";
  }
}

DType parse_dtype(const char* fn, const char* what, const std::string& name) {
  if (name == "float32") return DType::Float32;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "float16") return DType::Float16;
  throw py::type_error(str(fn, ": ", what, " must be 'float32', 'bfloat16' or 'float16', got '", name, "'"));
}

// The dtype of a + b in PyTorch's type promotion, for two of the float dtypes above.
DType promote(DType a, DType b) { return a == b ? a : DType::Float32; }

void check_address(const char* fn, const std::string& what, uintptr_t address, size_t alignment, bool required) {
  if (address == 0) {
    if (required) throw py::value_error(str(fn, ": ", what, " is a null address"));
    return;
  }
  if (address % alignment != 0)
    throw py::value_error(str(fn, ": ", what, " (address 0x", std::hex, address, std::dec, ") is not aligned to its ",
                              alignment, "-byte elements"));
}

// Checks a list of tensor addresses against the numels: same length, each aligned to its
// element size, non-null unless the tensor is empty.
void check_list(const char* fn, const char* what, const Addresses& list, const std::vector<int64_t>& numels, size_t elem_size) {
  if (list.size() != numels.size())
    throw py::value_error(str(fn, ": ", list.size(), " ", what, " for ", numels.size(), " numels (give one per tensor)"));
  for (size_t i = 0; i < list.size(); ++i) check_address(fn, str(what, "[", i, "]"), list[i], elem_size, numels[i] > 0);
}

void check_numels(const char* fn, const std::vector<int64_t>& numels) {
  for (size_t i = 0; i < numels.size(); ++i)
    if (numels[i] < 0 || numels[i] > fastjepa::kMaxNumel)
      throw py::value_error(str(fn, ": numels[", i, "] = ", numels[i], " is outside [0, ", fastjepa::kMaxNumel, "]"));
}

void check_launch(const char* fn, const char* kernel, cudaError_t error) {
  if (error != cudaSuccess)
    throw std::runtime_error(str(fn, ": CUDA error launching ", kernel, ": ", cudaGetErrorName(error), ": ",
                                 cudaGetErrorString(error)));
}

template <typename T>
std::vector<T> pointers(const Addresses& list) {
  std::vector<T> out(list.size());
  for (size_t i = 0; i < list.size(); ++i) out[i] = reinterpret_cast<T>(list[i]);
  return out;
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the error, report none
    return 0;
  }
  return count;
}

void ema_update(const Addresses& targets, const Addresses& onlines, const Addresses& shadows, const std::vector<int64_t>& numels,
                const std::string& online_dtype, const std::optional<std::string>& shadow_dtype, uintptr_t momentum,
                uintptr_t stream) {
  const char* fn = "fastjepa._C.ema_update";
  fastjepa::EmaArgs args;
  args.online_dtype = parse_dtype(fn, "online_dtype", online_dtype);
  if (shadow_dtype) args.shadow_dtype = parse_dtype(fn, "shadow_dtype", *shadow_dtype);
  check_numels(fn, numels);
  check_list(fn, "targets", targets, numels, 4);
  check_list(fn, "onlines", onlines, numels, dtype_size(args.online_dtype));
  if (!shadows.empty() || shadow_dtype) {
    if (!shadow_dtype) throw py::type_error(str(fn, ": shadows given without a shadow_dtype"));
    check_list(fn, "shadows", shadows, numels, dtype_size(args.shadow_dtype));
  }
  check_address(fn, "momentum", momentum, 4, true);
  args.targets = pointers<float*>(targets);
  args.onlines = pointers<const void*>(onlines);
  args.shadows = pointers<void*>(shadows);
  args.numels = numels;
  args.momentum = reinterpret_cast<const float*>(momentum);
  check_launch(fn, "ema_kernel", fastjepa::launch_ema(args, as_stream(stream)));
}

void adamw_ema(const Addresses& params, const Addresses& grads, const Addresses& exp_avgs, const Addresses& exp_avg_sqs,
               const Addresses& targets, const Addresses& shadows, const std::vector<int64_t>& numels,
               const std::vector<int32_t>& groups, uintptr_t lr, uintptr_t weight_decay, int num_groups, uintptr_t step,
               uintptr_t momentum, double beta1, double beta2, double eps, const std::optional<std::string>& shadow_dtype,
               uintptr_t skip, uintptr_t stream) {
  const char* fn = "fastjepa._C.adamw_ema";
  fastjepa::AdamWEmaArgs args;
  if (shadow_dtype) args.shadow_dtype = parse_dtype(fn, "shadow_dtype", *shadow_dtype);
  check_numels(fn, numels);
  check_list(fn, "params", params, numels, 4);
  check_list(fn, "grads", grads, numels, 4);
  check_list(fn, "exp_avgs", exp_avgs, numels, 4);
  check_list(fn, "exp_avg_sqs", exp_avg_sqs, numels, 4);
  if (!targets.empty()) check_list(fn, "targets", targets, numels, 4);
  if (!shadows.empty() || shadow_dtype) {
    if (targets.empty()) throw py::value_error(str(fn, ": shadows need targets (the shadow is a copy of the new target)"));
    if (!shadow_dtype) throw py::type_error(str(fn, ": shadows given without a shadow_dtype"));
    check_list(fn, "shadows", shadows, numels, dtype_size(args.shadow_dtype));
  }
  if (groups.size() != numels.size())
    throw py::value_error(str(fn, ": ", groups.size(), " groups for ", numels.size(), " tensors (give one group index per tensor)"));
  if (num_groups < 1) throw py::value_error(str(fn, ": num_groups must be at least 1, got ", num_groups));
  for (size_t i = 0; i < groups.size(); ++i)
    if (groups[i] < 0 || groups[i] >= num_groups)
      throw py::value_error(str(fn, ": groups[", i, "] = ", groups[i], " is outside [0, ", num_groups, ")"));
  check_address(fn, "lr", lr, 4, true);
  check_address(fn, "weight_decay", weight_decay, 4, true);
  check_address(fn, "step", step, 4, true);
  check_address(fn, "momentum", momentum, 4, !targets.empty());
  check_address(fn, "skip", skip, 1, false);
  if (!(beta1 >= 0.0 && beta1 < 1.0) || !(beta2 >= 0.0 && beta2 < 1.0))
    throw py::value_error(str(fn, ": betas must lie in [0, 1), got (", beta1, ", ", beta2, ")"));
  if (!(eps >= 0.0)) throw py::value_error(str(fn, ": eps must be non-negative, got ", eps));
  args.params = pointers<float*>(params);
  args.grads = pointers<const float*>(grads);
  args.exp_avgs = pointers<float*>(exp_avgs);
  args.exp_avg_sqs = pointers<float*>(exp_avg_sqs);
  args.targets = pointers<float*>(targets);
  args.shadows = pointers<void*>(shadows);
  args.numels = numels;
  args.groups = groups;
  args.lr = reinterpret_cast<const float*>(lr);
  args.weight_decay = reinterpret_cast<const float*>(weight_decay);
  args.step = reinterpret_cast<const float*>(step);
  args.momentum = reinterpret_cast<const float*>(momentum);
  args.skip = reinterpret_cast<const bool*>(skip);
  args.beta1 = beta1, args.beta2 = beta2, args.eps = eps;
  check_launch(fn, "adamw_ema_kernel", fastjepa::launch_adamw_ema(args, as_stream(stream)));
}

void gather_forward(uintptr_t out, uintptr_t src, uintptr_t pos, uintptr_t idx, uintptr_t token_row, const std::string& out_dtype,
                    const std::string& src_dtype, const std::optional<std::string>& pos_dtype, const std::string& idx_dtype,
                    int mode, int64_t tokens, int64_t dim, int64_t k, int64_t batch, const std::array<int64_t, 3>& src_strides,
                    const std::array<int64_t, 2>& pos_strides, uintptr_t stream) {
  const char* fn = "fastjepa._C.gather_forward";
  fastjepa::GatherForwardArgs a;
  a.out_dtype = parse_dtype(fn, "out_dtype", out_dtype);
  a.src_dtype = parse_dtype(fn, "src_dtype", src_dtype);
  if (pos_dtype) a.pos_dtype = parse_dtype(fn, "pos_dtype", *pos_dtype);
  if (idx_dtype != "int32" && idx_dtype != "int64")
    throw py::type_error(str(fn, ": idx_dtype must be 'int32' or 'int64', got '", idx_dtype, "'"));
  a.idx_int64 = idx_dtype == "int64";
  const DType promoted = pos_dtype ? promote(a.src_dtype, a.pos_dtype) : a.src_dtype;
  if (a.out_dtype != a.src_dtype && a.out_dtype != promoted)
    throw py::type_error(str(fn, ": out_dtype must be src_dtype (", dtype_name(a.src_dtype), ") or its promotion with pos_dtype (",
                             dtype_name(promoted), "), got ", dtype_name(a.out_dtype)));
  if (mode < 0 || mode > 2) throw py::value_error(str(fn, ": mode must be 0 (gather), 1 (same row) or 2 (one row), got ", mode));
  a.mode = static_cast<fastjepa::GatherMode>(mode);
  if (tokens < 0 || dim < 0) throw py::value_error(str(fn, ": tokens and dim must be non-negative, got ", tokens, " and ", dim));
  if (k < 1 || batch < 1) throw py::value_error(str(fn, ": k and batch must be positive, got ", k, " and ", batch));
  for (int64_t s : src_strides)
    if (s < 0) throw py::value_error(str(fn, ": src_strides must be non-negative, got a stride of ", s));
  for (int64_t s : pos_strides)
    if (s < 0) throw py::value_error(str(fn, ": pos_strides must be non-negative, got a stride of ", s));
  if (token_row && a.mode != fastjepa::GatherMode::Gather)
    throw py::value_error(str(fn, ": token_row is for mode 0 (gather) only, got mode ", mode));
  if (bool(pos) != bool(pos_dtype))
    throw py::value_error(str(fn, ": give both pos and pos_dtype, or neither (pos is ", pos ? "set" : "0", ")"));
  const bool work = tokens > 0 && dim > 0;
  check_address(fn, "out", out, dtype_size(a.out_dtype), work);
  check_address(fn, "src", src, dtype_size(a.src_dtype), work);
  check_address(fn, "pos", pos, dtype_size(a.pos_dtype), false);
  check_address(fn, "idx", idx, a.idx_int64 ? 8 : 4, work);
  check_address(fn, "token_row", token_row, 4, false);
  a.out = reinterpret_cast<void*>(out);
  a.src = reinterpret_cast<const void*>(src);
  a.pos = reinterpret_cast<const void*>(pos);
  a.idx = reinterpret_cast<const void*>(idx);
  a.token_row = reinterpret_cast<const int32_t*>(token_row);
  a.tokens = tokens, a.dim = dim, a.k = k, a.batch = batch;
  a.src_stride_b = src_strides[0], a.src_stride_n = src_strides[1], a.src_stride_d = src_strides[2];
  a.pos_stride_n = pos_strides[0], a.pos_stride_d = pos_strides[1];
  check_launch(fn, "gather_forward_kernel", fastjepa::launch_gather_forward(a, as_stream(stream)));
}

void gather_backward(uintptr_t grad_x, uintptr_t grad, uintptr_t inv, const std::string& grad_x_dtype, const std::string& grad_dtype,
                     int64_t rows, int64_t dim, int groups, uintptr_t stream) {
  const char* fn = "fastjepa._C.gather_backward";
  fastjepa::GatherBackwardArgs a;
  a.grad_x_dtype = parse_dtype(fn, "grad_x_dtype", grad_x_dtype);
  a.grad_dtype = parse_dtype(fn, "grad_dtype", grad_dtype);
  if (a.grad_dtype != a.grad_x_dtype && a.grad_dtype != DType::Float32)
    throw py::type_error(str(fn, ": grad_dtype must be grad_x_dtype (", dtype_name(a.grad_x_dtype), ") or float32, got ",
                             dtype_name(a.grad_dtype)));
  if (rows < 0 || dim < 0) throw py::value_error(str(fn, ": rows and dim must be non-negative, got ", rows, " and ", dim));
  if (groups < 1) throw py::value_error(str(fn, ": groups must be at least 1, got ", groups));
  const bool work = rows > 0 && dim > 0;
  check_address(fn, "grad_x", grad_x, dtype_size(a.grad_x_dtype), work);
  check_address(fn, "grad", grad, dtype_size(a.grad_dtype), false);  // no tokens: every row is zero
  check_address(fn, "inv", inv, 4, work);
  a.grad_x = reinterpret_cast<void*>(grad_x);
  a.grad = reinterpret_cast<const void*>(grad);
  a.inv = reinterpret_cast<const int32_t*>(inv);
  a.rows = rows, a.dim = dim, a.groups = groups;
  check_launch(fn, "gather_backward_kernel", fastjepa::launch_gather_backward(a, as_stream(stream)));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastjepa's CUDA kernels (csrc/): raw device addresses, sizes, dtype names and a stream handle";
  m.def("device_count", &device_count, "The number of CUDA devices (cudaGetDeviceCount); 0 without a GPU or a driver.");
  m.def("ema_update", &ema_update, "target <- m * target + (1 - m) * online over many tensors; optional shadow copies.",
        py::arg("targets"), py::arg("onlines"), py::arg("shadows"), py::arg("numels"), py::kw_only(), py::arg("online_dtype"),
        py::arg("shadow_dtype"), py::arg("momentum"), py::arg("stream"));
  m.def("adamw_ema", &adamw_ema, "torch.optim.AdamW's step, then the EMA of the new parameters into the targets, in one pass.",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("targets"), py::arg("shadows"),
        py::arg("numels"), py::arg("groups"), py::kw_only(), py::arg("lr"), py::arg("weight_decay"), py::arg("num_groups"),
        py::arg("step"), py::arg("momentum"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("shadow_dtype"),
        py::arg("skip"), py::arg("stream"));
  m.def("gather_forward", &gather_forward, "out[t] = src[row of t] + pos[idx[t]] into a contiguous (tokens, dim) out.",
        py::arg("out"), py::arg("src"), py::arg("pos"), py::arg("idx"), py::arg("token_row"), py::kw_only(), py::arg("out_dtype"),
        py::arg("src_dtype"), py::arg("pos_dtype"), py::arg("idx_dtype"), py::arg("mode"), py::arg("tokens"),
        py::arg("dim"), py::arg("k"), py::arg("batch"), py::arg("src_strides"), py::arg("pos_strides"), py::arg("stream"));
  m.def("gather_backward", &gather_backward, "grad_x[row] = sum over groups of grad[inv[g * rows + row]], every row written once.",
        py::arg("grad_x"), py::arg("grad"), py::arg("inv"), py::kw_only(), py::arg("grad_x_dtype"), py::arg("grad_dtype"),
        py::arg("rows"), py::arg("dim"), py::arg("groups"), py::arg("stream"));
}
