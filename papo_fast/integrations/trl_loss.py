"""PAPOTrainer's fused loss: ``fused_linear_policy_loss`` from the LM head, TRL's counts.

    PAPOTrainer(..., fused_loss=True)   # no [tokens x vocab] logits in the training step

Choices:
1. **Inside the model's forward.** The loss runs the decoder body, then reads the LM-head weight.
   DDP must see its wrapper's forward before a backward (``prepare_for_backward``), and FSDP
   unshards the root's parameters (embeddings, LM head) only during the root's forward. So the
   whole loss runs through TRL's own ``_ForwardRedirection`` (its distillation trainer's way):
   the wrapper's forward calls our function with the unwrapped model, every hook fires. Metrics
   that need a collective are reduced after it returns, outside the forward. The LM-head weight
   is read as TRL's own fused LM head reads it: a DTensor (FSDP2) as its whole tensor, a ZeRO-3
   partition gathered by TRL's ``maybe_gather_lm_head_ctx`` for the call (the loss computes its
   gradients during the forward, which that context requires). The decoder runs under the
   trainer's autocast, the LM head and the loss outside it, in the hidden states' dtype.
2. **TRL's counts.** Each ``loss_type`` is an aggregation and the counts that give exactly TRL's
   loss of the micro-batch (TRL divides by the gradient accumulation steps itself; DDP averages
   the ranks' gradients):

       loss_type  agg                       counts given
       grpo       seq-mean-token-mean       num_seqs = B * accumulation steps
       bnpo       token-mean                num_tokens = the micro-batch's tokens * accumulation
       dr_grpo    seq-mean-token-sum-norm   num_seqs = B * accumulation,
                                            max_len = max_completion_length
       dapo       token-mean                num_tokens = num_items_in_batch / processes *
                                            accumulation / steps_per_generation
       cispo      token-mean                as dapo; loss_type cispo, whose bound is TRL's
                                            epsilon_high itself: eps_high = epsilon_high - 1,
                                            no lower bound (eps_low = 1)
       sapo       seq-mean-token-mean       as grpo; loss_type sapo, sapo_tau_pos / _neg =
                                            TRL's sapo_temperature_pos / _neg

   (accumulation is 1 in evaluation, as in TRL.) vespo and luspo weigh a sequence's tokens
   otherwise: refused, as are the TRL settings that reshape the token loss outside it
   (sequence-level importance sampling, the entropy mask, the off-policy mask, the entropy bonus,
   two-sided clipping ``delta``, vLLM's importance-sampling correction, the MoE auxiliary loss).
   With ``beta`` > 0 the KL term is TRL's, k3 against the reference log-probs TRL computes, times
   the token ratio when ``use_bias_correction_kl`` (``kl_ratio_correction``).
3. **Temperature.** The logits are divided by TRL's ``temperature`` before the softmax, as TRL's
   own log-probs are. Models that scale or soft-cap their logits otherwise are refused.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import maybe_gather_lm_head_ctx

from papo_fast.kernels.fused_linear_policy_loss import fused_linear_policy_loss
from papo_fast.kernels.loss_config import PolicyLossConfig

AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "sapo": "seq-mean-token-mean",
}
# config attributes with which a model changes its logits beyond hidden @ W.T + b
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling",
                 "final_logit_softcapping")  # fmt: skip


def _refusals(trainer) -> list[str]:
    """The settings the fused loss cannot reproduce, in words (empty: all supported)."""
    args = trainer.args
    out = []
    if trainer.importance_sampling_level != "token":
        out.append(
            f"importance_sampling_level={trainer.importance_sampling_level!r} (only 'token')"
        )
    if trainer.top_entropy_quantile < 1.0:
        out.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (the entropy mask)")
    if trainer.off_policy_mask_threshold is not None:
        out.append("off_policy_mask_threshold (the off-policy sequence mask)")
    if getattr(trainer, "_entropy_bonus_enabled", False):
        out.append("an entropy bonus (entropy_coef / adaptive entropy)")
    if args.delta is not None:
        out.append(f"delta={args.delta} (two-sided clipping)")
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        out.append("vllm_importance_sampling_correction")
    if trainer.aux_loss_enabled:
        out.append("the MoE auxiliary loss (router_aux_loss_coef)")
    if trainer.loss_type == "cispo" and trainer.epsilon_high < 1.0:
        out.append(f"cispo with epsilon_high={trainer.epsilon_high} (TRL's bound on the ratio "
                   "itself; below 1 it cuts every ratio that rises)")  # fmt: skip
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "peft_config"):
        out.append("a PEFT model (an adapter on the LM head or on the inputs is bypassed)")
    cfg = model.config.get_text_config()
    out += [f"model config {k}={getattr(cfg, k)!r}" for k in _LOGIT_SCALES
            if getattr(cfg, k, None) not in (None, 1.0)]  # fmt: skip
    return out


class FusedPolicyLoss:
    """TRL's clipped policy loss for ``trainer.loss_type``, computed by fused_linear_policy_loss.

    Args:
        trainer: the PAPOTrainer (its settings are read once here; its state at each call).

    Raises:
        ValueError: a loss_type or a setting the fused loss cannot match, named (choice 2).
    """

    def __init__(self, trainer):
        if trainer.loss_type not in AGG:
            raise ValueError(
                f"fused_loss=True supports loss_type in {sorted(AGG)}, got {trainer.loss_type!r}: "
                "its loss is not the clipped GRPO loss with these counts (use fused_loss=False)"
            )
        refused = _refusals(trainer)
        if refused:
            raise ValueError(f"fused_loss=True cannot reproduce: {'; '.join(refused)} "
                             "(use fused_loss=False)")  # fmt: skip
        self.trainer = trainer
        args, kind = trainer.args, trainer.loss_type
        bounds = {"eps_low": trainer.epsilon_low, "eps_high": trainer.epsilon_high}
        if kind == "cispo":  # TRL clamps the ratio at epsilon_high, with no lower bound
            bounds = {"eps_low": 1.0, "eps_high": trainer.epsilon_high - 1.0, "loss_type": kind}
        elif kind == "sapo":
            bounds |= {"loss_type": kind, "sapo_tau_pos": args.sapo_temperature_pos,
                       "sapo_tau_neg": args.sapo_temperature_neg}  # fmt: skip
        self.config = PolicyLossConfig(
            beta=trainer.beta, kl="k3", agg=AGG[kind], is_cap=None,
            kl_ratio_correction=trainer.beta != 0.0 and bool(args.use_bias_correction_kl),
            **bounds,
        )  # fmt: skip
        self.redirect = _ForwardRedirection()

    def counts(self, inputs: dict, mask: torch.Tensor, train: bool) -> dict:
        """The counts that make fused_linear_policy_loss equal TRL's loss (choice 2)."""
        t = self.trainer
        accumulation = t.current_gradient_accumulation_steps if train else 1
        kind = t.loss_type
        if kind in ("grpo", "sapo"):
            return {"num_seqs": mask.shape[0] * accumulation}
        if kind == "bnpo":
            return {"num_tokens": mask.sum().clamp(min=1.0) * accumulation}
        if kind == "dr_grpo":
            return {"num_seqs": mask.shape[0] * accumulation, "max_len": t.max_completion_length}
        tokens = inputs["num_items_in_batch"].clamp(min=1.0) / t.accelerator.num_processes
        if train:
            tokens = tokens * accumulation / t.args.steps_per_generation
        return {"num_tokens": tokens}

    def loss(self, model, inputs: dict):
        """The loss of one micro-batch, run inside the wrapper's forward (choice 1): the decoder's
        last hidden states of the completion positions, then the fused loss from the LM head."""
        t = self.trainer
        completion_ids = inputs["completion_ids"]
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        keep = completion_ids.shape[1]
        with t.accelerator.autocast():
            hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
        hidden = hidden.last_hidden_state[:, -keep - 1 : -1]  # [B, C, H]: predicts completion
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2 outside the head's own forward: the whole tensor
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        no_autocast = torch.autocast(hidden.device.type, enabled=False)
        with no_autocast, maybe_gather_lm_head_ctx(weight, bias):  # ZeRO-3: gathered
            out = fused_linear_policy_loss(
                hidden, weight, completion_ids, inputs.get("old_per_token_logps"),
                inputs["advantages"].to(torch.float32), bias=bias, temperature=t.temperature,
                return_entropy=True, mask=mask, ref_logp=inputs.get("ref_per_token_logps"),
                config=self.config, **self.counts(inputs, mask, t.model.training),
            )  # fmt: skip
        return out, mask

    def __call__(self, model, inputs: dict) -> torch.Tensor:
        t = self.trainer
        unwrapped = t.accelerator.unwrap_model(model)
        out, mask = self.redirect(model, unwrapped, self.loss, unwrapped, inputs)
        mode = "train" if t.model.training else "eval"
        ntok = mask.sum().to(torch.float32)

        entropy = (out.entropy * mask).sum() / ntok.clamp(min=1.0)
        means = {"entropy": entropy, "kl": out.kl} if t.beta != 0.0 else {"entropy": entropy}
        means |= {
            "clip_ratio/low_mean": out.clip_frac_low,
            "clip_ratio/high_mean": out.clip_frac_high,
            "clip_ratio/region_mean": out.clip_frac_low + out.clip_frac_high,
        }
        # token-weighted over the processes: one reduction and one read from the device for all
        local = torch.stack([m.detach().float() * ntok for m in means.values()] + [ntok])
        total = t.accelerator.reduce(local, reduction="sum")
        values = (total[:-1] / total[-1].clamp(min=1.0)).tolist()
        metrics = t._metrics[mode]
        for name, value in zip(means, values, strict=True):
            metrics[name].append(value)
        return out.loss
