import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "pymq.py").read_text(), re.M).group(1)

setup(
    name="pymq",
    version=VERSION,
    description="A durable STOMP message broker for task queues, in one file",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    py_modules=["pymq"],
    python_requires=">=3.9",
    install_requires=[line for line in (HERE / "requirements.txt").read_text().splitlines()
                      if line and not line.startswith("#")],
    entry_points={"console_scripts": ["pymq = pymq:main"]},
    data_files=[("share/pymq", ["conf/pymq.conf", "conf/pymq.service"])],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Framework :: gevent",
        "Topic :: System :: Networking",
    ],
)
