"""NeCo dense-feature service: the `neco` namespace.

Stages live in their own top-level folders and are mapped here by setuptools `package-dir`:
`neco.training`, `neco.export`, `neco.serving`, `neco.client`, `neco.evaluation`, the encoder
module `neco.model` and the end-to-end `neco.demo`. The modules of this folder are the
torch-free core every stage shares: `neco.contract` (constants, `ModelContract`),
`neco.signature` (the served tensors and their one validation), `neco.triton_config`
(the contract in config.pbtxt), `neco.layout` (image/mask folders), `neco.atomic`
(publishing files), `neco.errors` (one error base, exit codes), `neco.config` (YAML loading).
"""
