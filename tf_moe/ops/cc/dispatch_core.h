// Framework-free CPU core of the custom-call dispatch/combine ops.
//
// Computes, for one `Routing` (tf_moe/routing/router.py), the same function as
// the pure paths in tf_moe/ops/dispatch.py:
//
//   dispatch:     out[e, g, c, :] = x[g, s, :]  for each routed choice (g, s, j)
//                 with expert_index = e and position = c; 0 for empty slots.
//   combine:      out[g, s, :] = sum_j [routed] w[g, s, j] * y[e, g, c, :].
//   combine_grad: dy[e, g, c, :] = w[g, s, j] * dout[g, s, :]   (routed slots;
//                 0 elsewhere) and dw[g, s, j] = [routed] <dout[g, s], y[e, g, c]>.
//
// The adjoint of dispatch is combine with w = 1 on routed choices.
//
// A valid Routing gives each slot at most one routed choice; if two choices
// name the same slot (not a valid Routing), dispatch keeps the later one.
// Every routed choice's (expert, position) is checked before anything is
// written: a bad one returns an error and nothing is written out of bounds.
// Choices that are not routed are never read, whatever their indices.
//
// Only pointers and sizes here (no TF, XLA or CUDA types): the XLA FFI
// handlers (ffi_handlers.cc) and the TF kernels (tf_ops.cc) wrap it.
//
// Shape letters: G groups, S tokens per group, k choices per token, E experts,
// C capacity, d model dim.

#ifndef TF_MOE_OPS_CC_DISPATCH_CORE_H_
#define TF_MOE_OPS_CC_DISPATCH_CORE_H_

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

namespace tf_moe {

// 16-bit float storage types. Same size and layout as Eigen::bfloat16 /
// Eigen::half, xla::bf16 / xla::half and __nv_bfloat16 / __half.
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

inline float ToFloat(float v) { return v; }

inline float ToFloat(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float ToFloat(f16_t v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  uint32_t exponent = (v.bits >> 10) & 0x1fu;
  uint32_t mantissa = v.bits & 0x3ffu;
  uint32_t u;
  if (exponent == 0x1f) {  // inf / nan
    u = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // zero
    u = sign;
  } else {  // subnormal: normalize
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    u = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
T FromFloat(float f);

template <>
inline float FromFloat<float>(float f) {
  return f;
}

template <>
inline bf16_t FromFloat<bf16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{0x7fc0};  // nan
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

template <>
inline f16_t FromFloat<f16_t>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};
  if (abs < 0x33000001u) return f16_t{sign};  // rounds to zero
  int exponent = static_cast<int>(abs >> 23) - 127 + 15;
  uint32_t mantissa = (abs & 0x7fffffu) | 0x800000u;
  int shift = 13;
  if (exponent <= 0) {  // subnormal half
    shift = 14 - exponent;
    exponent = 0;
  }
  uint32_t half = mantissa >> shift;
  const uint32_t rest = mantissa & ((1u << shift) - 1);
  const uint32_t midpoint = 1u << (shift - 1);
  if (rest > midpoint || (rest == midpoint && (half & 1u))) ++half;
  // `half` holds the implicit bit for normals: adding it to the exponent
  // field carries correctly into the exponent on mantissa overflow.
  uint32_t bits = exponent == 0 ? half
                                : (static_cast<uint32_t>(exponent - 1) << 10) + half;
  return f16_t{static_cast<uint16_t>(sign | bits)};
}

// One batch of routing instructions, all <G, S, k> row-major.
struct RoutingView {
  const int32_t* expert_index;  // [G, S, k]
  const int32_t* position;      // [G, S, k]
  const bool* dispatch_mask;    // [G, S, k]
  int64_t groups;               // G
  int64_t group_size;           // S
  int64_t k;                    // k
  int64_t num_experts;          // E
  int64_t capacity;             // C

  int64_t num_choices() const { return groups * group_size * k; }
  // Flat row of choice `i` (= (g * S + s) * k + j) in an [E, G, C] buffer.
  int64_t slot(int64_t i) const {
    const int64_t g = i / (group_size * k);
    return (static_cast<int64_t>(expert_index[i]) * groups + g) * capacity +
           position[i];
  }
};

// ---------------------------------------------------------------------------
// Attribute and size checks, run before any buffer or shape is made from the
// attributes (TF's TensorShape and XLA's Shape abort the process on a size
// that overflows int64 instead of returning an error). Each returns an empty
// string if the check passes, else the message (without the "tf_moe: "
// prefix), with the numbers.

// Largest num_experts and capacity: expert_index and position are int32, so
// no routed choice can name an expert or a slot past 2**31 - 1.
constexpr int64_t kMaxRoutingAttr = 2147483647;

// `name` (an attribute: num_experts or capacity) is in [1, kMaxRoutingAttr].
inline std::string CheckRoutingAttr(const char* name, int64_t value,
                                    const char* index_name) {
  if (value >= 1 && value <= kMaxRoutingAttr) return std::string();
  return std::string("`") + name + "` must be in [1, " +
         std::to_string(kMaxRoutingAttr) + "] (`" + index_name +
         "` is int32). Received: " + name + "=" + std::to_string(value);
}

inline std::string ValidateRoutingAttrs(int64_t num_experts,
                                        int64_t capacity) {
  std::string message =
      CheckRoutingAttr("num_experts", num_experts, "expert_index");
  if (message.empty()) {
    message = CheckRoutingAttr("capacity", capacity, "position");
  }
  return message;
}

// One dimension of a buffer, with the name the user knows it by.
struct NamedDim {
  const char* name;
  int64_t value;
};

// A buffer `name` of dimensions `dims` and `element_bytes`-byte elements can
// exist: every dimension >= 0, and the running product of the dimensions (in
// order, as TensorShape and XLA's Shape compute it) and then of the element
// size stays within int64.
inline std::string CheckBufferSize(const char* name,
                                   std::initializer_list<NamedDim> dims,
                                   int64_t element_bytes) {
  constexpr int64_t kMax = INT64_MAX;
  bool ok = true;
  int64_t product = 1;
  for (const NamedDim& dim : dims) {
    if (dim.value < 0) {
      ok = false;
      break;
    }
    if (dim.value != 0 && product > kMax / dim.value) {
      ok = false;
      break;
    }
    product *= dim.value;
  }
  if (ok && element_bytes > 1 && product > kMax / element_bytes) ok = false;
  if (ok) return std::string();
  std::string names, received;
  size_t i = 0;
  for (const NamedDim& dim : dims) {
    const std::string sep = i++ ? ", " : "";
    names += sep + dim.name;
    received += sep + dim.name + "=" + std::to_string(dim.value);
  }
  return std::string("`") + name + "` [" + names +
         "] must have dimensions >= 0 and fit in int64: at most 2**63 - 1 "
         "elements and bytes (" + std::to_string(element_bytes) +
         " bytes each). Received: " + received;
}

// Empty string if every routed choice has 0 <= expert < E and 0 <= position
// < C; otherwise a message naming the first bad choice and its numbers.
// Checked whatever the model dim d (also d = 0, where no data moves).
inline std::string ValidateRouting(const RoutingView& r) {
  const int64_t n = r.num_choices();
  for (int64_t i = 0; i < n; ++i) {
    if (!r.dispatch_mask[i]) continue;
    const int64_t e = r.expert_index[i];
    const int64_t c = r.position[i];
    if (e < 0 || e >= r.num_experts || c < 0 || c >= r.capacity) {
      const int64_t j = i % r.k;
      const int64_t s = (i / r.k) % r.group_size;
      const int64_t g = i / (r.k * r.group_size);
      const bool bad_expert = e < 0 || e >= r.num_experts;
      return std::string("routed choice [") + std::to_string(g) + ", " +
             std::to_string(s) + ", " + std::to_string(j) + "] has " +
             (bad_expert ? "expert_index=" + std::to_string(e) +
                               " outside [0, num_experts=" +
                               std::to_string(r.num_experts) + ")"
                         : "position=" + std::to_string(c) +
                               " outside [0, capacity=" +
                               std::to_string(r.capacity) + ")");
    }
  }
  return std::string();
}

// x: [G, S, d] -> out: [E, G, C, d]. Call ValidateRouting first.
template <typename T>
void Dispatch(const T* x, const RoutingView& r, int64_t d, T* out) {
  std::memset(out, 0,
              sizeof(T) * r.num_experts * r.groups * r.capacity * d);
  const int64_t n = r.num_choices();
  for (int64_t i = 0; i < n; ++i) {
    if (!r.dispatch_mask[i]) continue;
    std::memcpy(out + r.slot(i) * d, x + (i / r.k) * d, sizeof(T) * d);
  }
}

// y: [E, G, C, d], weight: <float>[G, S, k] -> out: [G, S, d].
// Accumulates in float. Call ValidateRouting first.
template <typename T>
void Combine(const T* y, const RoutingView& r, const float* weight, int64_t d,
             T* out) {
  std::vector<float> acc(d);
  const int64_t tokens = r.groups * r.group_size;
  for (int64_t t = 0; t < tokens; ++t) {
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = t * r.k; i < (t + 1) * r.k; ++i) {
      if (!r.dispatch_mask[i]) continue;
      const float w = weight[i];
      const T* row = y + r.slot(i) * d;
      for (int64_t f = 0; f < d; ++f) acc[f] += w * ToFloat(row[f]);
    }
    T* dst = out + t * d;
    for (int64_t f = 0; f < d; ++f) dst[f] = FromFloat<T>(acc[f]);
  }
}

// Adjoint of Combine. dout: [G, S, d], y: [E, G, C, d], weight: [G, S, k]
// -> dy: [E, G, C, d], dweight: <float>[G, S, k]. Call ValidateRouting first.
template <typename T>
void CombineGrad(const T* dout, const T* y, const RoutingView& r,
                 const float* weight, int64_t d, T* dy, float* dweight) {
  std::memset(dy, 0, sizeof(T) * r.num_experts * r.groups * r.capacity * d);
  const int64_t n = r.num_choices();
  for (int64_t i = 0; i < n; ++i) {
    if (!r.dispatch_mask[i]) {
      dweight[i] = 0.0f;
      continue;
    }
    const T* g_row = dout + (i / r.k) * d;
    const int64_t slot = r.slot(i);
    const T* y_row = y + slot * d;
    T* dy_row = dy + slot * d;
    const float w = weight[i];
    float dot = 0.0f;
    for (int64_t f = 0; f < d; ++f) {
      const float g = ToFloat(g_row[f]);
      dot += g * ToFloat(y_row[f]);
      dy_row[f] = FromFloat<T>(w * g);
    }
    dweight[i] = dot;
  }
}

}  // namespace tf_moe

#endif  // TF_MOE_OPS_CC_DISPATCH_CORE_H_
