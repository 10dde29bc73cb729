"""Lightning training application for :class:`flash_attn.models.gpt.GPTLMHeadModel`.

This folder lives in the checkout (it is not installed): ``python train.py`` puts the checkout
root on ``sys.path``. See ``configs/`` for the Hydra configuration and ``training/train.py`` for
the entry point ``train(cfg)``.
"""
