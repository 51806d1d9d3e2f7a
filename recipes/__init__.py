"""BLIP-2 recipes: the YAML files ``blip2cli.config.load_recipe`` reads by short name (``pretrain/stage1_eva-g``)."""
