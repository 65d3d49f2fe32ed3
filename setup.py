"""Package discovery; everything else about the package is in pyproject.toml.

`passes/` sits at the top of the repository (the design card) but installs as
`umup_fx.passes`, so no top-level `passes` lands in site-packages. pyproject.toml can map
one folder to another name but cannot combine that with automatic discovery, so the
discovery is here: every package under `umup_fx/` and `passes/` is found, none listed by
hand (tests/test_packaging.py checks the built wheel against the source tree).
"""

from setuptools import find_packages, setup

packages = find_packages(include=["umup_fx", "umup_fx.*"])
packages += ["umup_fx." + name for name in find_packages(include=["passes", "passes.*"])]

setup(
    packages=packages,
    package_dir={"umup_fx.passes": "passes"},
    package_data={"umup_fx": ["py.typed"]},
)
