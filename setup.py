"""Packaging for pymq. The distribution is named "pymq-broker" (on PyPI, "pymq" is an unrelated
project); what it installs keeps the name pymq: the module, pymq_storage and the `pymq` command."""

import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
# The version lives in one place, pymq.py's __version__, read as text: importing pymq needs gevent.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "pymq.py").read_text(), re.M).group(1)

setup(
    name="pymq-broker",
    version=VERSION,
    description="A durable STOMP message broker for task queues, in one file",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author="the pymq authors",
    license="MIT",      # and no License classifier: setuptools >= 77 deprecates them
    keywords=["stomp", "message broker", "message queue", "task queue", "gevent"],
    py_modules=["pymq"],
    packages=["pymq_storage"],
    python_requires=">=3.9",
    install_requires=[line for line in (HERE / "requirements.txt").read_text().splitlines()
                      if line and not line.startswith("#")],
    entry_points={"console_scripts": ["pymq = pymq:main"]},
    # Installed under the prefix (a venv's, or /usr/local), for deployment: see README.
    data_files=[("share/pymq", ["conf/pymq.conf", "conf/pymq.service"])],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Environment :: No Input/Output (Daemon)",
        "Intended Audience :: Developers",
        "Intended Audience :: System Administrators",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: Implementation :: CPython",
        "Topic :: Communications",
        "Topic :: System :: Distributed Computing",
        "Topic :: System :: Networking",
    ],
)
