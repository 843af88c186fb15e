// nvcc instantiates the Gaussian spectral-map launcher for every input dtype.
#include "launchers.cuh"

namespace gsa::cuda {
template cudaError_t launch_gaussian_map<f16, float>(const GaussianMapParams<f16, float>&, cudaStream_t);
template cudaError_t launch_gaussian_map<bf16, float>(const GaussianMapParams<bf16, float>&, cudaStream_t);
template cudaError_t launch_gaussian_map<float, float>(const GaussianMapParams<float, float>&, cudaStream_t);
template cudaError_t launch_gaussian_map<double, double>(const GaussianMapParams<double, double>&, cudaStream_t);
}  // namespace gsa::cuda
