"""Evaluation on the paper's benchmarks: VQA accuracy (official algorithm), GQA exact match and captioning
metrics through pycocoevalcap. The ``blip2 eval`` commands are thin wrappers around these modules."""
