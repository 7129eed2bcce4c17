"""Timestep samplers for training (which t to train each batch element on)."""
import numpy as np
import torch


class UniformSampler:
    """Draw training timesteps uniformly from [0, T) using numpy's GLOBAL RNG.

    The draw is ``np.random.choice(T, size=(bs,), p=w / w.sum())`` with uniform w, i.e. the same numbers as the
    original EgoHMR / guided-diffusion sampler for a given ``np.random.seed``.

    :param num_timesteps: T (an int, or an object with a ``num_timesteps`` attribute such as a diffusion).
    """

    def __init__(self, num_timesteps):
        num_timesteps = int(getattr(num_timesteps, "num_timesteps", num_timesteps))
        if num_timesteps < 1:
            raise ValueError(f"UniformSampler: num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = num_timesteps
        self._weights = np.ones([num_timesteps], dtype=np.float64)

    def weights(self):
        """Unnormalised sampling weight of every timestep (all ones)."""
        return self._weights

    def sample(self, batch_size, device):
        """Return (timesteps LongTensor [bs], importance weights FloatTensor [bs]) on ``device``.

        The importance weights are 1 / (T p_t), i.e. all ones for the uniform sampler.
        """
        weights = self.weights()
        probabilities = weights / np.sum(weights)
        indices = np.random.choice(len(probabilities), size=(batch_size,), p=probabilities)
        importance = 1.0 / (len(probabilities) * probabilities[indices])
        timesteps = torch.from_numpy(indices).long().to(device)
        return timesteps, torch.from_numpy(importance).float().to(device)


def create_named_schedule_sampler(name, diffusion):
    """Sampler by name; only 'uniform' exists (EgoHMR's choice)."""
    if name == "uniform":
        return UniformSampler(diffusion)
    raise ValueError(f"unknown schedule sampler {name!r}; expected 'uniform'")
