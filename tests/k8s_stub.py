"""A loopback stand-in for the one Kubernetes API call Vault's Kubernetes auth makes.

OpenBao stays real: it parses the service account JWT itself (without checking its signature
when no ``pem_keys`` are configured) and asks the TokenReview API whether the token is
authentic. This stub answers that question for a set of known tokens.
"""

import base64
import json
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

# A self-signed CA certificate with no use but to be parsed: OpenBao requires one in
# auth/kubernetes/config when disable_local_ca_jwt is true. The stub itself speaks plain HTTP.
CA_CERT = """-----BEGIN CERTIFICATE-----
MIIBgjCCASmgAwIBAgIUNvTg1WAAsmRbomhOrTC9Ef/rN1IwCgYIKoZIzj0EAwIw
FjEUMBIGA1UEAwwLazhzLXN0dWItY2EwIBcNMjYxMTI0MDU1MzUyWhgPMjEyNjEw
MzEwNTUzNTJaMBYxFDASBgNVBAMMC2s4cy1zdHViLWNhMFkwEwYHKoZIzj0CAQYI
KoZIzj0DAQcDQgAEzk31oerdgwN2BHkb6OWuYDthlQWIY3/T/1zf+6ylYY2OQywI
VMC9Qg04EaFIlUFVGZFNWPE7aTZ1VjtcHX1VR6NTMFEwHQYDVR0OBBYEFFbMFjQS
TCuIwuPmJ/Fco90WIOfvMB8GA1UdIwQYMBaAFFbMFjQSTCuIwuPmJ/Fco90WIOfv
MA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgMNUK5RaG6WWHo+7M
HaVr0+8M5R79yEKx9AissgSCvfkCIAYw+vRgRUwEc5TRPjqXNRMT9I5zjW1I/2R5
uaxIWRzo
-----END CERTIFICATE-----
"""


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def service_account_jwt(namespace: str, name: str, uid: str) -> str:
    """A JWT shaped like a legacy service account token, with a random (unverifiable) signature."""
    header = {"alg": "RS256", "typ": "JWT"}
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io/serviceaccount/namespace": namespace,
        "kubernetes.io/serviceaccount/service-account.name": name,
        "kubernetes.io/serviceaccount/service-account.uid": uid,
    }
    return ".".join(
        [
            _b64(json.dumps(header).encode()),
            _b64(json.dumps(claims).encode()),
            _b64(secrets.token_bytes(64)),
        ]
    )


class TokenReviewStub:
    """``POST /apis/authentication.k8s.io/v1/tokenreviews`` on 127.0.0.1, in a thread.

    A token in ``accepted`` (token -> (namespace, name, uid)) is reviewed as authenticated;
    any other as not. ``reviews`` counts the reviews answered.
    """

    def __init__(self):
        self.accepted: dict[str, tuple[str, str, str]] = {}
        self.reviews = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if self.path != TOKEN_REVIEW_PATH:
                    self._answer(404, {"kind": "Status", "status": "Failure", "code": 404})
                    return
                stub.reviews += 1
                token = (body.get("spec") or {}).get("token", "")
                if token in stub.accepted:
                    namespace, name, uid = stub.accepted[token]
                    status = {
                        "authenticated": True,
                        "user": {
                            "username": f"system:serviceaccount:{namespace}:{name}",
                            "uid": uid,
                            "groups": ["system:serviceaccounts"],
                        },
                    }
                else:
                    status = {"authenticated": False, "error": "token is not valid"}
                self._answer(
                    201,
                    {
                        "apiVersion": "authentication.k8s.io/v1",
                        "kind": "TokenReview",
                        "spec": body.get("spec") or {},
                        "status": status,
                    },
                )

            def _answer(self, code, payload):
                raw = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def accept(self, namespace: str, name: str, uid: str) -> str:
        """A new service account token that the stub reviews as authentic."""
        token = service_account_jwt(namespace, name, uid)
        self.accepted[token] = (namespace, name, uid)
        return token

    def start(self) -> "TokenReviewStub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
