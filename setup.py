"""Package discovery (the rest of the metadata is in pyproject.toml).

kernels/, tasks/ and configs/ sit at the top level of the repository (the project card's layout) but install
inside the package as fasttd3_lora.kernels, .tasks and .configs, so no top-level `kernels` or `tasks` module
clashes in users' environments. Every package below fasttd3_lora/ and below those folders is found, not listed:
a new subpackage (fasttd3_lora/loops/ was missed by a hand list once) ships without touching this file.
"""

from setuptools import find_packages, setup

MAPPED = {"fasttd3_lora.kernels": "kernels", "fasttd3_lora.tasks": "tasks", "fasttd3_lora.configs": "configs"}

packages = find_packages(include=["fasttd3_lora", "fasttd3_lora.*"])
for name, folder in MAPPED.items():
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(folder))]

setup(packages=packages, package_dir=MAPPED)
