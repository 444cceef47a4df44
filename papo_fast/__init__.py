"""papo_fast: Triton-accelerated PAPO / GRPO for LLM reinforcement learning."""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# config, rewards and trainer import transformers, datasets and yaml only when they run.
from papo_fast.config import Config, load_config
from papo_fast.kernels.advantages import (
    Advantages,
    AdvantagesOutput,
    papo_advantages,
    token_advantages,
)
from papo_fast.kernels.fused_linear_logprobs import fused_linear_logprobs
from papo_fast.kernels.fused_linear_policy_loss import (
    FusedPolicyLoss,
    FusedPolicyLossOutput,
    PAPOLoss,
    fused_linear_policy_loss,
)
from papo_fast.kernels.logits_policy_loss import LogitsPolicyLossOutput, logits_policy_loss
from papo_fast.kernels.loss_config import PolicyLossConfig
from papo_fast.kernels.policy_loss import (
    PolicyLoss,
    PolicyLossModule,
    PolicyLossOutput,
    policy_loss,
)
from papo_fast.rewards import Judge, Outcome, Verifier
from papo_fast.trainer import Trainer

__all__ = [
    "AdvantagesOutput",
    "Advantages",
    "papo_advantages",
    "token_advantages",
    "PolicyLossConfig",
    "PolicyLossOutput",
    "PolicyLoss",
    "PolicyLossModule",
    "policy_loss",
    "logits_policy_loss",
    "LogitsPolicyLossOutput",
    "fused_linear_logprobs",
    "fused_linear_policy_loss",
    "FusedPolicyLossOutput",
    "FusedPolicyLoss",
    "PAPOLoss",
    "Config",
    "load_config",
    "Judge",
    "Outcome",
    "Verifier",
    "Trainer",
]

__version__ = "0.1.0"

# Modules that moved when the package was split into rollout/, rewards/ and tasks/ (and the
# dispatch helper into kernels/): their old import paths, and "module:attr" names in configs,
# keep working for one release, with a DeprecationWarning.
MOVED_MODULES = {
    "papo_fast.rollout_vllm": "papo_fast.rollout.vllm",
    "papo_fast.judge": "papo_fast.rewards.judge",
    "papo_fast.verify": "papo_fast.rewards.verify",
    "papo_fast.arith": "papo_fast.tasks.arith",
    "papo_fast.demo": "papo_fast.tasks.demo",
    "papo_fast._backend": "papo_fast.kernels._backend",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module path as the module it moved to."""

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED_MODULES else None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; the old name will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the module it moved to is already executed


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
