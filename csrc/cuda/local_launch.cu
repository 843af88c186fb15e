// nvcc instantiates the local-score-machine launcher for every input dtype.
#include "launchers.cuh"

namespace gsa::cuda {
template cudaError_t launch_local_posterior<f16, float>(const LocalParams<f16, float>&, cudaStream_t);
template cudaError_t launch_local_posterior<bf16, float>(const LocalParams<bf16, float>&, cudaStream_t);
template cudaError_t launch_local_posterior<float, float>(const LocalParams<float, float>&, cudaStream_t);
template cudaError_t launch_local_posterior<double, double>(const LocalParams<double, double>&, cudaStream_t);
}  // namespace gsa::cuda
