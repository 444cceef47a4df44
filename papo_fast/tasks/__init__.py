"""Built-in tasks: data, tokenizer, tiny model and rubric of the demo (arith.py), and the demo
itself (demo.py). Importing this package registers their reward names ("arith_rubric")."""

from papo_fast.tasks import arith

__all__ = ["arith"]
