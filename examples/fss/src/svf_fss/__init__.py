"""svf-fss: few-shot segmentation with Singular Value Fine-tuning (reproduces the SVF paper's FSS tables).

Subpackages: ``svf_fss.data`` (datasets, folds, lists, episodes, transforms, metrics, label tools) and
``svf_fss.models``. Nothing is imported here so that ``import svf_fss`` stays cheap.
"""

__version__ = "0.1.0"
