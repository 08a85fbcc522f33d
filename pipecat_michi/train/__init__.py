"""Training recipe for MichiAI: codec, listening head, speaking head + backbone, then joint
duplex fine-tuning (components pretrained separately, trained together last).

``michi-train`` (``pipecat_michi.train.cli``) runs one stage per subcommand; docs/training.md
describes the manifest format and the stages.
"""
