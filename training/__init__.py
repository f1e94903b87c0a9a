"""training: the four stages of "State of GPT", one module each.

``data`` + ``tokenizer`` (stage 0), ``pretrain``, ``sft``, ``reward_model``, ``rl``;
``pipeline`` runs them in order and resumably.
"""
