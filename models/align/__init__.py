"""CARE-style alignment of a small query encoder with a decoder-only document encoder.

Two stages (CARE, ACL 2026): stage I trains the query encoder into the frozen document encoder's space
on self-pairs (a text against its own document vector); stage II fine-tunes both sides on labelled
(query, positive, negatives) groups, the document side through a few top layers or LoRA so that its
change ships as a small delta over the base weights.

Modules, in data-flow order: ``data`` (training groups and self-pair texts), ``negatives`` (hard
negative mining), ``losses``, ``lora``, ``state_cache`` (frozen lower-layer states), ``document_side``,
``query_side``, ``stage_configs`` (one config per stage), ``train`` (each stage's batches and loss on
the one loop of ``models.training_loop``), ``selection`` (held-out selection queries and their score),
``artifacts`` (delta files, rebuilt encoder directories and manifests naming the new space), ``probe``
(seconds per training step); ``pipeline`` and ``frozen`` run them from a recipe.
"""
