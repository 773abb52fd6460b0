"""Certificates made on the fly for the TLS tests (never checked in: the keys are private).

make_pki(directory) writes, as PEM files: a CA, a server certificate it signed for 127.0.0.1
and localhost, a client certificate it signed (CN alice), and a second, unrelated CA with a
client certificate of its own (CN mallory). Returns a dict of the paths.
"""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key, path):
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _certificate(subject, key, issuer, issuer_key, is_ca=False, server=False):
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(_name(issuer))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True)
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _issue(directory, name, subject, ca, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(subject, key, ca["subject"], ca["key"], server=server)
    (directory / (name + ".pem")).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, directory / (name + ".key"))
    return str(directory / (name + ".pem")), str(directory / (name + ".key"))


def _authority(directory, name, subject):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(subject, key, subject, key, is_ca=True)
    (directory / (name + ".pem")).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return {"subject": subject, "key": key, "path": str(directory / (name + ".pem"))}


def make_pki(directory):
    ca = _authority(directory, "ca", "pymq test CA")
    other = _authority(directory, "other-ca", "some other CA")
    paths = {"ca": ca["path"], "other_ca": other["path"]}
    paths["server_cert"], paths["server_key"] = _issue(directory, "server", "localhost", ca,
                                                       server=True)
    paths["client_cert"], paths["client_key"] = _issue(directory, "alice", "alice", ca)
    paths["bob_cert"], paths["bob_key"] = _issue(directory, "bob", "bob", ca)
    paths["other_cert"], paths["other_key"] = _issue(directory, "mallory", "mallory", other)
    return paths
