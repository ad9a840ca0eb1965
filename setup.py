"""Packaging for Satchel: `pip install -e .[dev]` gives the `satchel` command."""

from setuptools import find_packages, setup

setup(
    name="satchel",
    version="0.1.0",
    description="Projects and tasks whose files are zipped straight into S3.",
    python_requires=">=3.11",
    packages=find_packages(include=["server*", "handlers*", "tasks*", "storage*"]),
    package_data={"storage": ["migrations/*.sql"]},
    install_requires=[
        "tornado>=6.5.7,<7",
        "peewee>=4.3,<4.4",
        "peewee-async>=2.1,<2.2",
        "psycopg[binary,pool]>=3.2,<4",
        "zipstream-ng>=1.8,<2",
        "isal>=1.7,<2",
        "aiobotocore>=2.15,<4",
        "marshmallow>=3.20,<5",
        "apispec>=6.6,<7",
        "prometheus-client>=0.20,<1",
        "orjson>=3.10,<4",
    ],
    extras_require={
        "dev": [
            "moto[server]>=5.0,<6",
            "pytest>=8.3,<10",
            "pytest-asyncio>=0.25,<2",
            "pytest-cov>=5,<8",
            "pytest-timeout>=2.3,<3",
            "ruff>=0.8,<1",
            "mypy>=1.13,<3",
            "pre-commit>=3.5,<5",
            "schemathesis>=4.32,<5",
            "supervisor>=4.2,<5",
        ],
    },
    entry_points={"console_scripts": ["satchel=server.main:cli"]},
)
