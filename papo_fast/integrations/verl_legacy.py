"""Importing this module patches verl's legacy trainer for the ``papo`` estimator
(``verl_trainer.patch_legacy_trainer``): name it in ``VERL_USE_EXTERNAL_MODULES`` so that every
verl process, the trainer's included, applies the patch when it imports verl."""

from papo_fast.integrations.verl_trainer import patch_legacy_trainer

patch_legacy_trainer()
