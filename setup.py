"""Maps the folders at the repository root into the `dsarl` namespace (DESIGN.md section 1).

Everything else is in pyproject.toml; this file exists only because a package-dir mapping of
root folders, with their sub-packages discovered, cannot be written declaratively.
"""
from setuptools import find_packages, setup

ROOT_PACKAGES = ["models", "kernels", "actors", "rewards", "learner", "data", "launch", "configs"]

packages, package_dir = ["dsarl"], {"dsarl": "dsarl"}
for root in ROOT_PACKAGES:
    packages.append(f"dsarl.{root}")
    package_dir[f"dsarl.{root}"] = root
    packages += [f"dsarl.{root}.{sub}" for sub in find_packages(root)]

setup(packages=packages, package_dir=package_dir)
