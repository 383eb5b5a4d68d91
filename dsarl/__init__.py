"""dsarl: GRPO post-training for DeepSeek Sparse Attention decoders on Ray.

The sub-packages live as folders at the repository root (see pyproject's package-dir):
dsarl.models, dsarl.kernels, dsarl.actors, dsarl.rewards, dsarl.learner, dsarl.data, dsarl.launch.
"""

__version__ = "0.1.0"
