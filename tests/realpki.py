"""Real keys and certificates for mock runs, computed the way pulumi-tls computes them.

Used only by the bootstrap replay (tests/replay.py), where no provider plugin runs: the
PEMs are real, so etcd, the API server and kubelets on real VMs can use them.
"""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


def private_key(inputs: dict) -> dict:
    if inputs.get("algorithm") == "ED25519":
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    pub = key.public_key()
    return {
        "privateKeyPem": pem.decode(),
        "publicKeyPem": pub.public_bytes(PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "privateKeyOpenssh": key.private_bytes(PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()).decode(),
        "publicKeyOpenssh": pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + "\n",
    }


def _name(subject: dict | None) -> x509.Name:
    attrs = []
    if subject and subject.get("organization"):
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, subject["organization"]))
    if subject and subject.get("commonName"):
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, subject["commonName"]))
    return x509.Name(attrs)


def _load_key(pem: str):
    return serialization.load_pem_private_key(pem.encode(), password=None)


def _build(subject: x509.Name, issuer: x509.Name, public_key, signer, inputs: dict, is_ca: bool,
           dns: list[str], ips: list[str]) -> str:
    uses = set(inputs.get("allowedUses", []))
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + dt.timedelta(hours=int(inputs.get("validityPeriodHours", 8760))))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature="digital_signature" in uses, content_commitment=False,
                   key_encipherment="key_encipherment" in uses, data_encipherment=False, key_agreement=False,
                   key_cert_sign="cert_signing" in uses, crl_sign="crl_signing" in uses,
                   encipher_only=False, decipher_only=False), critical=True))
    eku = [oid for use, oid in (("server_auth", ExtendedKeyUsageOID.SERVER_AUTH),
                                ("client_auth", ExtendedKeyUsageOID.CLIENT_AUTH)) if use in uses]
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()).public_bytes(PEM).decode()


def self_signed_cert(inputs: dict) -> dict:
    key = _load_key(inputs["privateKeyPem"])
    name = _name(inputs.get("subject"))
    return {"certPem": _build(name, name, key.public_key(), key, inputs, bool(inputs.get("isCaCertificate")), [], [])}


def cert_request(inputs: dict) -> dict:
    key = _load_key(inputs["privateKeyPem"])
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(inputs.get("subject")))
    sans = [x509.DNSName(d) for d in inputs.get("dnsNames") or []]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in inputs.get("ipAddresses") or []]
    if sans:
        csr = csr.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return {"certRequestPem": csr.sign(key, hashes.SHA256()).public_bytes(PEM).decode()}


def locally_signed_cert(inputs: dict) -> dict:
    csr = x509.load_pem_x509_csr(inputs["certRequestPem"].encode())
    ca = x509.load_pem_x509_certificate(inputs["caCertPem"].encode())
    ca_key = _load_key(inputs["caPrivateKeyPem"])
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns, ips = san.get_values_for_type(x509.DNSName), [str(i) for i in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    return {"certPem": _build(csr.subject, ca.subject, csr.public_key(), ca_key, inputs, False, dns, ips)}


BY_TYPE = {
    "tls:index/privateKey:PrivateKey": private_key,
    "tls:index/selfSignedCert:SelfSignedCert": self_signed_cert,
    "tls:index/certRequest:CertRequest": cert_request,
    "tls:index/locallySignedCert:LocallySignedCert": locally_signed_cert,
}
