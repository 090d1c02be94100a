"""For agents that keep weights derived from their parameters between forward passes (VarShare's
theta + mu_m, PaCo's composed sum_k w_tk V_k) so that acting does not rebuild them every step.

Such a cache goes stale whenever the parameters change. The update rule calls
``clear_weight_cache()`` after every optimiser step (fused Adam does not advance the tensors'
version counters, so those cannot be relied on); this mixin adds the two other ways parameters
change: loading a state dict, and moving or casting the module (.to(), .double(), .cuda())."""

from __future__ import annotations

import torch.nn as nn


class WeightCacheMixin(nn.Module):
    def clear_weight_cache(self) -> None:
        raise NotImplementedError

    def load_state_dict(self, *args, **kwargs):
        result = super().load_state_dict(*args, **kwargs)
        self.clear_weight_cache()
        return result

    def _apply(self, *args, **kwargs):
        self.clear_weight_cache()
        return super()._apply(*args, **kwargs)
