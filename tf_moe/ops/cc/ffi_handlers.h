// The XLA FFI handler symbols of ffi_handlers.cc (CPU platform "Host").

#ifndef TF_MOE_OPS_CC_FFI_HANDLERS_H_
#define TF_MOE_OPS_CC_FFI_HANDLERS_H_

#include "xla/ffi/api/c_api.h"

extern "C" {
XLA_FFI_Error* TfMoeDispatchHost(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* TfMoeCombineHost(XLA_FFI_CallFrame* call_frame);
XLA_FFI_Error* TfMoeCombineGradHost(XLA_FFI_CallFrame* call_frame);
}

#endif  // TF_MOE_OPS_CC_FFI_HANDLERS_H_
