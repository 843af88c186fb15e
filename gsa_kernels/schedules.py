"""Noise schedules (placeholder until the sampling issue lands)."""
import torch


def karras(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """EDM/Karras sigmas: [num_steps + 1], descending, last 0."""
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)])
