# Repo-root conftest: makes `import gsa_kernels` resolve to this checkout (with its in-place
# built extension) when pytest runs from the repo root.
