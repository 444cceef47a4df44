"""A tiny training run for the trainer's tests: model, data, config and a verifier with signal."""

from papo_fast.config import config_from_dict
from papo_fast.rewards import Outcome, Verifier
from papo_fast.tasks import arith
from papo_fast.trainer import Trainer


class ParityVerifier(Verifier):
    """Correct when the response has an even number of characters: a reward an untrained model
    gets half the time, so groups have a signal (the arithmetic verifier would give all zeros)."""

    def verify(self, problems, responses, answers):
        return [Outcome(float(len(r) % 2 == 0), len(r) % 2 == 0) for r in responses]


def build_assets(root):
    """A tiny model, its tokenizer and two small splits under ``root``."""
    tok = arith.build_tokenizer()
    tok.save_pretrained(root / "model")
    arith.build_model(tok, hidden_size=64, layers=1, seed=0).save_pretrained(root / "model")
    arith.write_jsonl(arith.make_split(0, 24, 2, 3), root / "train.jsonl")
    arith.write_jsonl(arith.make_split(1, 4, 2, 4), root / "heldout.jsonl")
    return root


def make_config(assets, out, **train):
    return config_from_dict(
        {
            "model": {"path": str(assets / "model")},
            "data": {
                "train_path": str(assets / "train.jsonl"),
                "eval_path": str(assets / "heldout.jsonl"),
            },
            "rollout": {"group_size": 4, "max_new_tokens": 12},
            "optim": {"lr": 1e-3},
            "train": {
                "out_dir": str(out),
                "steps": 1,
                "prompts_per_step": 4,
                "mini_batches": 2,
                "micro_batch_size": 4,
                "eval_prompts": 4,
                "eval_k": 2,
                "progress": False,
                **train,
            },
        }
    )


def make_trainer(cfg, resume=False):
    trainer = Trainer(cfg, resume=resume)
    trainer.verifier = ParityVerifier()
    return trainer
