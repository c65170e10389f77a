"""NeCo dense-feature service: the `neco` namespace.

Stages live in their own top-level folders and are mapped here by setuptools `package-dir`:
`neco.training`, `neco.export`, `neco.serving`, `neco.client`, `neco.evaluation`.
`neco.contract` holds the constants they all share; `neco.config` loads their YAML configs.
"""

__version__ = "0.1.0"
