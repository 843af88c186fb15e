// Declarations of the CUDA launchers for the torch binding (compiled by the host compiler; the
// definitions are instantiated in gaussian_launch.cu, mixture_launch.cu and local_launch.cu). No torch here.
#pragma once
#include <cuda_runtime_api.h>

#include "params.h"

namespace gsa::cuda {

template <typename In, typename Acc>
cudaError_t launch_gaussian_map(const GaussianMapParams<In, Acc>& p, cudaStream_t stream);

template <typename In, typename Acc>
cudaError_t launch_mixture_posterior(const MixtureParams<In, Acc>& p, cudaStream_t stream);

template <typename In, typename Acc>
cudaError_t launch_local_posterior(const LocalParams<In, Acc>& p, cudaStream_t stream);

}  // namespace gsa::cuda
