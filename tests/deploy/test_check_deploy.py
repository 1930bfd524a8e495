"""Shows that every check of check_deploy.py can fail: each test breaks one thing in a copy of
the repository and asserts that exactly the expected check fails (and that the unbroken copy
passes).

    LOCKSTEP_BIN=target/debug/lockstep python3 -m unittest discover -s tests/deploy -v
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import tempfile
import unittest
from pathlib import Path

import check_deploy

ROOT = check_deploy.DEFAULT_ROOT
BIN = os.environ.get("LOCKSTEP_BIN") or str(
    Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/lockstep-target")) / "debug/lockstep"
)


def repository_files() -> list[str]:
    """The files of the work tree (tracked, and new ones not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


FILES = repository_files()


def run_checks(root: Path) -> tuple[int, list[str], str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = check_deploy.main([BIN, "--root", str(root)])
    failed = [line[5:] for line in out.getvalue().splitlines() if line.startswith("FAIL ")]
    return code, failed, out.getvalue()


class Mutations(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name)
        for f in FILES:
            (self.root / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, self.root / f)

    def tearDown(self) -> None:
        self.tmp.cleanup()

    def edit(self, path: str, old: str, new: str) -> None:
        file = self.root / path
        text = file.read_text()
        self.assertIn(old, text, f"{path} changed: update this mutation")
        file.write_text(text.replace(old, new, 1))

    def assert_fails(self, *expected: str) -> None:
        """Every `expected` substring names a failed check, and nothing else failed."""
        code, failed, output = run_checks(self.root)
        self.assertEqual(code, 1, f"the broken copy passed:\n{output}")
        for want in expected:
            self.assertTrue(any(want in f for f in failed), f"no failed check mentions {want!r}; failed: {failed}")
        unexpected = [f for f in failed if not any(want in f for want in expected)]
        self.assertEqual(unexpected, [], f"other checks failed too:\n{output}")

    # The baseline.

    def test_the_repository_passes(self) -> None:
        code, failed, output = run_checks(self.root)
        self.assertEqual((code, failed), (0, []), output)

    # Dockerfile.

    def test_copy_of_a_missing_path(self) -> None:
        self.edit("deploy/Dockerfile", "COPY hub hub", "COPY hubs hub")
        self.assert_fails("COPY source hubs exists", "workspace path hub is copied")

    def test_copy_of_an_excluded_path(self) -> None:
        self.edit("deploy/Dockerfile.dockerignore", "\ntarget\n", "\ntarget\napi\n")
        self.assert_fails("COPY source api exists and is not excluded", "workspace path api", "sources of workspace member api")

    def test_excluded_sources_inside_a_copied_member(self) -> None:
        self.edit("deploy/Dockerfile.dockerignore", "\ntarget\n", "\ntarget\n**/migrations\n")
        self.assert_fails("sources of workspace member api")

    def test_a_workspace_member_not_copied(self) -> None:
        self.edit("deploy/Dockerfile", "COPY loadtest loadtest\n", "")
        self.assert_fails("workspace path loadtest is copied")

    def test_a_member_copied_to_the_wrong_place(self) -> None:
        self.edit("deploy/Dockerfile", "COPY protocol protocol", "COPY protocol .")
        self.assert_fails("workspace path protocol is copied into the builder at /src/protocol")

    def test_builder_rust_differs_from_the_toolchain(self) -> None:
        self.edit("deploy/Dockerfile", "FROM rust:1.95.0-bookworm", "FROM rust:1.94.0-bookworm")
        self.assert_fails("builder image rust:1.94.0-bookworm is the pinned Rust")

    def test_runtime_without_user(self) -> None:
        self.edit("deploy/Dockerfile", "USER 10001:10001\n", "")
        self.assert_fails("runs as a non-root user")

    def test_runtime_as_root(self) -> None:
        self.edit("deploy/Dockerfile", "USER 10001:10001", "USER 0:10001")
        self.assert_fails("runs as a non-root user")

    def test_no_healthcheck(self) -> None:
        self.edit("deploy/Dockerfile", "HEALTHCHECK --interval", "# HEALTHCHECK --interval")
        self.edit("deploy/Dockerfile", '    CMD ["/usr/local/bin/lockstep", "healthcheck"]', "")
        self.assert_fails("runtime stage has a HEALTHCHECK")

    def test_healthcheck_none(self) -> None:
        self.edit("deploy/Dockerfile", "HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \\\n"
                  '    CMD ["/usr/local/bin/lockstep", "healthcheck"]', "HEALTHCHECK NONE")
        self.assert_fails("runtime stage has a HEALTHCHECK")

    def test_healthcheck_with_curl_the_image_lacks(self) -> None:
        self.edit("deploy/Dockerfile", 'CMD ["/usr/local/bin/lockstep", "healthcheck"]',
                  'CMD ["curl", "-f", "http://127.0.0.1:8080/healthz"]')
        self.assert_fails("HEALTHCHECK's curl is installed")

    def test_healthcheck_subcommand_that_does_not_exist(self) -> None:
        self.edit("deploy/Dockerfile", '"healthcheck"]', '"health-check"]')
        self.assert_fails("HEALTHCHECK: `lockstep health-check` exists")

    def test_entrypoint_not_serve(self) -> None:
        self.edit("deploy/Dockerfile", 'CMD ["serve"]', 'CMD ["migrate"]')
        self.assert_fails("image runs `lockstep serve`")

    def test_entrypoint_binary_not_in_the_image(self) -> None:
        self.edit("deploy/Dockerfile", 'ENTRYPOINT ["/usr/local/bin/lockstep"]', 'ENTRYPOINT ["/usr/bin/lockstep"]')
        self.assert_fails("ENTRYPOINT's /usr/bin/lockstep is copied into the runtime stage")

    # compose.yaml.

    def test_two_nodes(self) -> None:
        self.edit("deploy/compose.yaml", "  lockstep-3: *lockstep\n", "")
        self.assert_fails("exactly three Lockstep nodes", "upstream lockstep server lockstep-3:8080 is a compose service")

    def test_four_nodes(self) -> None:
        self.edit("deploy/compose.yaml", "  lockstep-3: *lockstep\n", "  lockstep-3: *lockstep\n  lockstep-4: *lockstep\n")
        self.assert_fails("exactly three Lockstep nodes", "upstream lockstep lists node lockstep-4")

    def test_a_variable_that_is_no_key(self) -> None:
        self.edit("deploy/compose.yaml", "    LOCKSTEP_REDIS_URL:", "    LOCKSTEP_REDIS_ADDR: x\n    LOCKSTEP_REDIS_URL:")
        self.assert_fails("compose service lockstep-1: ", "compose service lockstep-2: ", "compose service lockstep-3: ")

    def test_stop_grace_below_the_shutdown_grace(self) -> None:
        self.edit("deploy/compose.yaml", "stop_grace_period: 20s", "stop_grace_period: 5s")
        self.assert_fails("stop_grace_period 5s > shutdown grace")

    def test_upstream_missing_a_node(self) -> None:
        self.edit("deploy/compose-nginx.conf", "        server lockstep-2:8080", "        # server lockstep-2:8080")
        self.assert_fails("upstream lockstep lists node lockstep-2")

    def test_no_upgrade_header(self) -> None:
        self.edit("deploy/compose-nginx.conf", "proxy_set_header Upgrade $http_upgrade;", "")
        self.assert_fails("passes the Upgrade header")

    def test_no_connection_header(self) -> None:
        self.edit("deploy/compose-nginx.conf", "proxy_set_header Connection $connection_upgrade;", "")
        self.assert_fails("sets Connection for upgrades")

    def test_connection_header_without_its_map(self) -> None:
        self.edit("deploy/compose-nginx.conf", "map $http_upgrade $connection_upgrade", "map $http_upgrade $other")
        self.assert_fails("sets Connection for upgrades")

    def test_http_1_0_to_the_nodes(self) -> None:
        self.edit("deploy/compose-nginx.conf", "proxy_http_version 1.1;", "")
        self.assert_fails("proxies with HTTP/1.1")

    def test_no_nginx(self) -> None:
        self.edit("deploy/compose.yaml", "      - ./compose-nginx.conf:/etc/nginx/nginx.conf:ro\n", "      - ./compose-nginx.conf:/tmp/nginx.conf:ro\n")
        self.assert_fails("mounts an nginx configuration")

    # The compose gateway: only /ws, /api/… and /console… are public, as behind the Ingress.

    def test_compose_gateway_proxies_everything(self) -> None:
        self.edit("deploy/compose-nginx.conf", "        location / {\n            return 404;\n",
                  "        location / {\n            proxy_pass http://lockstep;\n")
        self.assert_fails("compose-nginx.conf: gateway keeps /metrics on the compose network",
                          "compose-nginx.conf: gateway keeps /healthz on the compose network",
                          "compose-nginx.conf: gateway keeps /readyz on the compose network",
                          "compose-nginx.conf: gateway answers other paths itself")

    def test_compose_gateway_proxies_metrics(self) -> None:
        self.edit("deploy/compose-nginx.conf", "        location / {\n",
                  "        location /metrics {\n            proxy_pass http://lockstep;\n        }\n\n"
                  "        location / {\n")
        self.assert_fails("compose-nginx.conf: gateway keeps /metrics on the compose network")

    def test_compose_gateway_proxies_a_probe_through_a_node(self) -> None:
        self.edit("deploy/compose-nginx.conf", "        location / {\n",
                  "        location = /readyz {\n            proxy_pass http://lockstep-2:8080;\n        }\n\n"
                  "        location / {\n")
        self.assert_fails("compose-nginx.conf: gateway keeps /readyz on the compose network")

    def test_compose_gateway_without_the_api(self) -> None:
        self.edit("deploy/compose-nginx.conf", "location ~ ^/(ws$|api/|", "location ~ ^/(ws$|apis/|")
        self.assert_fails("compose-nginx.conf: gateway routes /api/v1/publish to the nodes",
                          "compose-nginx.conf: gateway routes /api/v1/openapi.json to the nodes",
                          "compose-nginx.conf: gateway answers other paths itself")

    # nginx logs: browsers send their token as /ws?access_token=…

    def test_compose_nginx_logs_the_request_line(self) -> None:
        self.edit("deploy/compose-nginx.conf", '"$request_method $uri $server_protocol"', '"$request"')
        self.assert_fails("deploy/compose-nginx.conf: log_format lockstep logs no query string")

    def test_compose_nginx_logs_an_argument(self) -> None:
        self.edit("deploy/compose-nginx.conf", '"$http_user_agent"', '"$http_user_agent" ${arg_access_token}')
        self.assert_fails("deploy/compose-nginx.conf: log_format lockstep logs no query string")

    def test_compose_nginx_access_log_in_the_default_format(self) -> None:
        self.edit("deploy/compose-nginx.conf", "access_log /dev/stdout lockstep;", "access_log /dev/stdout;")
        self.assert_fails("deploy/compose-nginx.conf: access_log /dev/stdout names a format of its own (combined)")

    def test_compose_nginx_access_log_combined(self) -> None:
        self.edit("deploy/compose-nginx.conf", "access_log /dev/stdout lockstep;", "access_log /dev/stdout combined;")
        self.assert_fails("deploy/compose-nginx.conf: access_log /dev/stdout names a format of its own (combined)")

    def test_compose_nginx_without_access_log(self) -> None:
        self.edit("deploy/compose-nginx.conf", "    access_log /dev/stdout lockstep;\n", "")
        self.assert_fails("deploy/compose-nginx.conf: the http block sets access_log")

    def test_compose_nginx_error_log_at_the_default_level(self) -> None:
        self.edit("deploy/compose-nginx.conf", "error_log /dev/stderr crit;", "error_log /dev/stderr;")
        self.assert_fails("deploy/compose-nginx.conf: error_log at crit or above (error)")

    def test_compose_nginx_without_error_log(self) -> None:
        self.edit("deploy/compose-nginx.conf", "error_log /dev/stderr crit;\n", "")
        self.assert_fails("deploy/compose-nginx.conf: error_log at crit or above (unset)")

    def test_local_cluster_nginx_logs_the_query_string(self) -> None:
        self.edit("deploy/local-cluster", r'"\$request_method \$uri \$server_protocol"', r'"\$request_method \$request_uri \$server_protocol"')
        self.assert_fails("deploy/local-cluster: log_format lockstep logs no query string")

    def test_local_cluster_nginx_access_log_in_the_default_format(self) -> None:
        self.edit("deploy/local-cluster", "access_log $dir/access.log lockstep;", "access_log $dir/access.log;")
        self.assert_fails("deploy/local-cluster: access_log <dir>/access.log names a format of its own (combined)")

    def test_local_cluster_nginx_error_log_at_notice(self) -> None:
        self.edit("deploy/local-cluster", "error_log $dir/error.log crit;", "error_log $dir/error.log notice;")
        self.assert_fails("deploy/local-cluster: error_log at crit or above (notice)")

    def test_test_harness_nginx_logs_the_request_line(self) -> None:
        self.edit("tests/src/nginx.rs", '"$request_method $uri $server_protocol"', '"$request"')
        self.assert_fails("tests/src/nginx.rs: log_format lockstep logs no query string")

    def test_test_harness_nginx_error_log_at_info(self) -> None:
        self.edit("tests/src/nginx.rs", "error_log {d}/error.log crit;", "error_log {d}/error.log info;")
        self.assert_fails("tests/src/nginx.rs: error_log at crit or above (info)")

    def test_ingress_nginx_logs_the_request_line(self) -> None:
        self.edit("deploy/k8s/ingress-nginx-logging.yaml", '"$request_method $uri $server_protocol"', '"$request"')
        self.assert_fails("log-format-upstream logs no query string", "README.md's Helm values")

    def test_ingress_nginx_error_log_at_the_default_level(self) -> None:
        self.edit("deploy/k8s/ingress-nginx-logging.yaml", "  error-log-level: crit\n", "")
        self.assert_fails("error-log-level notice is crit or above", "README.md's Helm values")

    def test_ingress_nginx_without_its_configmap(self) -> None:
        (self.root / "deploy/k8s/ingress-nginx-logging.yaml").unlink()
        self.assert_fails("deploy/k8s has the ingress-nginx ConfigMap with log-format-upstream")

    def test_k8s_readme_helm_values_differ(self) -> None:
        self.edit("deploy/k8s/README.md", "    error-log-level: crit\n```", "    error-log-level: error\n```")
        self.assert_fails("README.md's Helm values")

    # Kubernetes.

    def test_readiness_on_healthz(self) -> None:
        self.edit("deploy/k8s/deployment.yaml", "httpGet: { path: /readyz, port: http }", "httpGet: { path: /healthz, port: http }")
        self.assert_fails("readiness probe on /readyz")

    def test_no_liveness(self) -> None:
        self.edit("deploy/k8s/deployment.yaml", "          livenessProbe:\n            httpGet: { path: /healthz, port: http }\n"
                  "            periodSeconds: 10\n            failureThreshold: 3\n", "")
        self.assert_fails("liveness probe on /healthz")

    def test_no_prestop(self) -> None:
        self.edit("deploy/k8s/deployment.yaml", "            preStop:\n              exec:\n"
                  '                command: ["sleep", "5"]\n', "            postStart:\n              exec:\n"
                  '                command: ["true"]\n')
        self.assert_fails("preStop delay")

    def test_no_resource_requests(self) -> None:
        self.edit("deploy/k8s/deployment.yaml", "requests: { cpu: 500m, memory: 256Mi }", "requests: { memory: 256Mi }")
        self.assert_fails("resource requests")

    def test_termination_grace_too_short(self) -> None:
        self.edit("deploy/k8s/deployment.yaml", "terminationGracePeriodSeconds: 35", "terminationGracePeriodSeconds: 25")
        self.assert_fails("terminationGracePeriodSeconds 25 > shutdown grace 20s + preStop 5s")

    def test_shutdown_grace_raised_alone(self) -> None:
        self.edit("deploy/k8s/config.yaml", "LOCKSTEP_SHUTDOWN_GRACE: 20s", "LOCKSTEP_SHUTDOWN_GRACE: 1m")
        self.assert_fails("terminationGracePeriodSeconds 35 > shutdown grace 60s + preStop 5s")

    def test_configmap_key_that_is_no_key(self) -> None:
        self.edit("deploy/k8s/config.yaml", "  LOCKSTEP_S3_REGION:", "  LOCKSTEP_S3_REGON:")
        self.assert_fails("k8s ConfigMap lockstep")

    def test_ingress_exposing_metrics(self) -> None:
        self.edit("deploy/k8s/ingress.yaml", "          - path: /api\n", "          - path: /\n")
        self.assert_fails("keeps /metrics inside", "keeps /healthz inside", "keeps /readyz inside")

    def test_ingress_without_the_websocket(self) -> None:
        self.edit("deploy/k8s/ingress.yaml", "          - path: /ws\n", "          - path: /wss\n")
        self.assert_fails("routes /ws")

    def test_k8s_readme_without_the_external_services(self) -> None:
        (self.root / "deploy/k8s/README.md").unlink()
        self.assert_fails("explains the external services")


if __name__ == "__main__":
    unittest.main()
