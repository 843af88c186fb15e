// nvcc instantiates the mixture-posterior launcher for every input dtype.
#include "launchers.cuh"

namespace gsa::cuda {
template cudaError_t launch_mixture_posterior<f16, float>(const MixtureParams<f16, float>&, cudaStream_t);
template cudaError_t launch_mixture_posterior<bf16, float>(const MixtureParams<bf16, float>&, cudaStream_t);
template cudaError_t launch_mixture_posterior<float, float>(const MixtureParams<float, float>&, cudaStream_t);
template cudaError_t launch_mixture_posterior<double, double>(const MixtureParams<double, double>&, cudaStream_t);
}  // namespace gsa::cuda
