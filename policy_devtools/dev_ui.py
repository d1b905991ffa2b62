"""`dagster dev` on loopback with the local Policy API simulator, for trying the UI.

    python -m policy_devtools.dev_ui [--port 3000]

If POLICY_API_ENDPOINT is set, that API is used and no simulator is started.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from policy_devtools.demo import policy_api
from policy_pipeline.core.settings import PROJECT_ROOT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dagster dev with the Policy API simulator")
    parser.add_argument("--port", type=int, default=3000, help="webserver port on 127.0.0.1")
    args = parser.parse_args(argv)
    env = dict(os.environ)
    # `dagster dev` prepares the dbt manifest with the `dbt` on PATH: this interpreter's.
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DAGSTER_HOME", str(PROJECT_ROOT / "data" / "dagster_home"))
    os.makedirs(env["DAGSTER_HOME"], exist_ok=True)
    with policy_api(env) as description:
        print(f"Policy API: {description}", flush=True)
        print(f"Dagster UI: http://127.0.0.1:{args.port}", flush=True)
        command = [sys.executable, "-m", "dagster", "dev", "-h", "127.0.0.1", "-p", str(args.port)]
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:
            process.terminate()
            return process.wait()


if __name__ == "__main__":
    sys.exit(main())
