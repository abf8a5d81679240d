"""Print the requirements of the project and of the extras named, one per line, from pyproject.toml.

The Dockerfile installs them in a layer of their own, before it copies the code, so that a change to the
code rebuilds only the layer that installs the project itself.  Usage: python requirements.py server openai
"""

import sys
from pathlib import Path

import tomllib

project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
wanted = list(project["dependencies"])
for extra in sys.argv[1:]:
    wanted += project["optional-dependencies"][extra]
print("\n".join(wanted))
