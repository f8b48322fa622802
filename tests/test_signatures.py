"""Tests for the OpenSSH signature verifier: RFC 8032 vectors, RFC 8017 encoding rules, the allowed_signers
and PROTOCOL.sshsig formats, fixed ssh-keygen signatures, and live round trips with ssh-keygen when installed."""

import base64
import calendar
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import tracemalloc
import unittest
from unittest import mock

from support import (QUICK_TIMING, ROOT, SERVER, TempDirTestCase, archive_bytes, make_update, publish,
                     python_executable, require_binary, update_members, wait_until)

import box_update_server as sig

NAMESPACE = "opq-box-update"
SSH_KEYGEN = shutil.which("ssh-keygen")
P = 2 ** 255 - 19
L = 2 ** 252 + 27742317777372353535851937790883648493
BASE_POINT_ENCODED = bytes.fromhex("58" + "66" * 31)  # RFC 8032 §5.1: B, y = 4/5, x even

# RFC 8032 §7.1: (name, public key, message, signature)
TEST_1024_MESSAGE = (
    "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98"
    "fa6e264bf09efe12ee50f8f54e9f77b1e355f6c50544e23fb1433ddf73be84d8"
    "79de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
    "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc"
    "1a858efcb8550ee3a5e1998bd177e93a7363c344fe6b199ee5d02e82d522c4fe"
    "ba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
    "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbef"
    "efd75499da96bd68a8a97b928a8bbc103b6621fcde2beca1231d206be6cd9ec7"
    "aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
    "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2"
    "d17ba70eb6248e594e1a2297acbbb39d502f1a8c6eb6f1ce22b3de1a1f40cc24"
    "554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
    "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc"
    "2732e69485bbc9c90bfbd62481d9089beccf80cfe2df16a2cf65bd92dd597b07"
    "07e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
    "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51a"
    "ddd3b75a2b1ae0784504df543af8969be3ea7082ff7fc9888c144da2af58429e"
    "c96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
    "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c"
    "42f58c30c04aafdb038dda0847dd988dcda6f3bfd15c4b4c4525004aa06eeff8"
    "ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
    "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08"
    "d78ff4ef5d63653a65040cf9bfd4aca7984a74d37145986780fc0b16ac451649"
    "de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
    "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a3"
    "2ef5b52a1ecc820e308aa342721aac0943bf6686b64b2579376504ccc493d97e"
    "6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
    "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b5"
    "0d334ba77c225bc307ba537152f3f1610e4eafe595f6d9d90d11faa933a15ef1"
    "369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
    "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c"
    "0618983f8741c5ef68d3a101e8a3b8cac60c905c15fc910840b94c00a0b9d0")
RFC_8032_VECTORS = (
    ("TEST 1", "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f05"
     "95bbe24655141438e7a100b"),
    ("TEST 2", "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb"
     "4302aeeb00d291612bb0c00"),
    ("TEST 3", "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e97"
     "16ed28dc027beceea1ec40a"),
    ("TEST 1024", "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e", TEST_1024_MESSAGE,
     "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350aa5371b1508f9f4528ecea23c436d94b5e8fcd4f6"
     "81e30a6ac00a9704a188a03"),
    ("TEST SHA(abc)", "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
     "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a2192992a274fc1a836ba3c23a3feebbd454d4423"
     "643ce80e2a9ac94fa54ca49f",
     "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b58909351fc9ac90b3ecfdfbc7c66431e0303dca179c1"
     "38ac17ad9bef1177331a704"),
)

# Made once with OpenSSH 9.2's ssh-keygen -Y sign -n opq-box-update (default hash sha512), so that the format
# tests run where ssh-keygen is not installed.
FIXTURE_MESSAGE = b"OPQ Box update fixture\n"
FIXTURE_ED25519_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIJAJNTdey9v7XI1FTFCwcnqRFzgiORbQ/RKrw9OStfK"
FIXTURE_ED25519_SIGNATURE = b"""-----BEGIN SSH SIGNATURE-----
U1NIU0lHAAAAAQAAADMAAAALc3NoLWVkMjU1MTkAAAAggkAk1N17L2/tcjUVMULByepEXO
CI5FtD9EqvD05K18oAAAAOb3BxLWJveC11cGRhdGUAAAAAAAAABnNoYTUxMgAAAFMAAAAL
c3NoLWVkMjU1MTkAAABADgneTCjDTLod27TInbadXtOkWVpdG2+zdfAO08RKS5QwWjZdy3
GqUzL19ax1h58seaWcS32QHA6HXf4Qh0JyDA==
-----END SSH SIGNATURE-----
"""
FIXTURE_RSA_KEY = (
    "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC5Bc8Ml5tGB9xp3VE54jqaR54TAynqb7xWKXZiuKSCU9VQkB3mgOr4yJIbBmmf+hgcnk0R"
    "hZkBCXYBWZDWyKJRT5hBqMrZmXTE21xnyWXphWFcMhYHgbNEyomfB3QkCvm/Hlfk0l5Y6MnTdrPPVfSFko3QuMQSG/n1Q44Vb/5rwAtMwT"
    "IeF46ayn8AuudWYSRYsSNFu0Sob+UxR0ckpAxl1EjI3s8Mql/J1nyYzzWS8c1wnwHK6+N7QVrtcS9kCa8C3gU9PSe/pTS2bPMKyhR9VMjJ"
    "20dTijXalBmIg10NzM5cDHQQctJ+VGu/w5fD/vUWnI88XwyjLl3wK814aWCf")
FIXTURE_RSA_SIGNATURE = b"""-----BEGIN SSH SIGNATURE-----
U1NIU0lHAAAAAQAAARcAAAAHc3NoLXJzYQAAAAMBAAEAAAEBALkFzwyXm0YH3GndUTniOp
pHnhMDKepvvFYpdmK4pIJT1VCQHeaA6vjIkhsGaZ/6GByeTRGFmQEJdgFZkNbIolFPmEGo
ytmZdMTbXGfJZemFYVwyFgeBs0TKiZ8HdCQK+b8eV+TSXljoydN2s89V9IWSjdC4xBIb+f
VDjhVv/mvAC0zBMh4XjprKfwC651ZhJFixI0W7RKhv5TFHRySkDGXUSMjezwyqX8nWfJjP
NZLxzXCfAcrr43tBWu1xL2QJrwLeBT09J7+lNLZs8wrKFH1UyMnbR1OKNdqUGYiDXQ3Mzl
wMdBBy0n5Ua7/Dl8P+9RacjzxfDKMuXfArzXhpYJ8AAAAOb3BxLWJveC11cGRhdGUAAAAA
AAAABnNoYTUxMgAAARQAAAAMcnNhLXNoYTItNTEyAAABABhYAGVFfQo5QTgqQfw0OewVZa
i9OM3E2zgSW8YosurOys7LKDjGGr++hCnfqU3nBlBD01VQm9I//ykTfAlYaRkACn9Xph8i
QWg1/Bu5sFdYuuXbBs2qhKHO/GLvgAocGY3NNjBMfqiKasOWkbSiAyde711aNXsYpCoUR8
LJwY+IWCKnnJ1HhQOIp34geKJoCPr0ATyH9IJtyQPQ1ujPm/2DIwg6RYpesSlVfPdA6xXD
1ZUEA8WsUTGv5l+nwvo/KBvCwXdATzpe6ajdeJ/8Cl4zDwL0zi16IXtuDtRCbletFLLOf0
lq0EdvhsmmCp/mJ4VDYQ0q+NSK+BpO91r7i6w=
-----END SSH SIGNATURE-----
"""
FIXTURE_SIGNERS = "alice@example.com %s\nbob@example.com %s\n" % (FIXTURE_ED25519_KEY, FIXTURE_RSA_KEY)


def ssh_string(data):
    """RFC 4251 §5 string, written independently of the module under test."""
    return len(data).to_bytes(4, "big") + data


def ssh_mpint(value):
    """RFC 4251 §5 mpint of a positive integer."""
    return ssh_string(value.to_bytes(value.bit_length() // 8 + 1, "big"))


def read_strings(blob):
    """Splits a blob made only of SSH strings."""
    fields = []
    while blob:
        size = int.from_bytes(blob[:4], "big")
        fields.append(blob[4:4 + size])
        blob = blob[4 + size:]
    return fields


def armor(blob, width=70):
    """PROTOCOL.sshsig §1 armor, wrapped as ssh-keygen wraps it."""
    text = base64.b64encode(blob).decode("ascii")
    body = "\n".join(text[start:start + width] for start in range(0, len(text), width))
    return ("-----BEGIN SSH SIGNATURE-----\n%s\n-----END SSH SIGNATURE-----\n" % body).encode("ascii")


def sshsig_blob(public_key, namespace, hash_algorithm, signature, reserved=b"", magic=b"SSHSIG", version=1):
    """PROTOCOL.sshsig §2 blob."""
    return (magic + version.to_bytes(4, "big") + ssh_string(public_key) + ssh_string(namespace.encode())
            + ssh_string(reserved) + ssh_string(hash_algorithm.encode()) + ssh_string(signature))


def rearmored(parsed, **changes):
    """An armored signature with some fields of a parsed one changed."""
    fields = dict(parsed._asdict(), **changes)
    return armor(sshsig_blob(fields["public_key"], fields["namespace"], fields["hash_algorithm"],
                             fields["signature"]))


def digest_of(signature, message):
    """H(message) as the server computes it (one pass, both digests), for the signature's hash algorithm."""
    return sig.hash_update_file(io.BytesIO(message)).for_algorithm(signature.hash_algorithm)


def flip_bit(data, bit):
    """data with one bit inverted."""
    changed = bytearray(data)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


def key_line(principals, key_type, blob, options=""):
    """An allowed_signers line."""
    return " ".join(part for part in (principals, options, key_type, base64.b64encode(blob).decode()) if part)


def signers_of(text):
    """The keys an allowed_signers text lists (the lines it skips are the warnings' business)."""
    return sig.parse_allowed_signers(text).signers


def rsa_blob(exponent=ssh_mpint(65537), modulus=ssh_mpint((1 << 2047) + 1)):
    """An "ssh-rsa" key blob (RFC 4253 §6.6) from ready-made mpint fields."""
    return ssh_string(b"ssh-rsa") + exponent + modulus


def small_rsa_key(bits=2048):
    """(n, e, d) of a fresh RSA key, made here so that a test can sign what ssh-keygen would not."""
    def probable_prime(size):
        while True:
            candidate = int.from_bytes(os.urandom(size // 8), "big") | (3 << (size - 2)) | 1
            if all(candidate % small for small in (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)) and all(
                    pow(base, candidate - 1, candidate) == 1 for base in (2, 3, 5, 7, 11)):
                return candidate
    while True:
        p, q = probable_prime(bits // 2), probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if phi % 65537:
            return p * q, 65537, modular_inverse(65537, phi)


def modular_inverse(value, modulus):
    """value ** -1 mod modulus (Python 3.7 has no pow(value, -1, modulus))."""
    old, new, old_t, new_t = modulus, value % modulus, 0, 1
    while new:
        quotient = old // new
        old, new, old_t, new_t = new, old - quotient * new, new_t, old_t - quotient * new_t
    return old_t % modulus


LINE_1 = " (allowed_signers line 1)"
ECDSA_BLOB = ssh_string(b"ecdsa-sha2-nistp256") + ssh_string(b"nistp256") + ssh_string(b"\x04" + bytes(range(64)))
RSA_1024_BLOB = rsa_blob(modulus=ssh_mpint((1 << 1023) + 1))


class Ed25519Tests(unittest.TestCase):
    """ed25519_verify against RFC 8032 §7.1 and the strictness rules of §5.1.3 and §5.1.7."""

    def vectors(self):
        for name, public_key, message, signature in RFC_8032_VECTORS:
            yield name, bytes.fromhex(public_key), bytes.fromhex(message), bytes.fromhex(signature)

    def test_vectors_are_the_rfcs(self):
        self.assertEqual(len(bytes.fromhex(TEST_1024_MESSAGE)), 1023)
        self.assertEqual(bytes.fromhex(RFC_8032_VECTORS[4][2]), hashlib.sha512(b"abc").digest())

    def test_rfc_8032_vectors_verify(self):
        for name, public_key, message, signature in self.vectors():
            with self.subTest(name):
                self.assertTrue(sig.ed25519_verify(public_key, message, signature))

    def test_a_flipped_signature_bit_fails(self):
        for name, public_key, message, signature in self.vectors():
            for bit in (0, 77, 254, 255, 256, 300, 447, 508, 511):
                with self.subTest(name, bit=bit):
                    self.assertFalse(sig.ed25519_verify(public_key, message, flip_bit(signature, bit)))

    def test_a_flipped_message_bit_fails(self):
        for name, public_key, message, signature in self.vectors():
            variants = [flip_bit(message, 0), flip_bit(message, 8 * len(message) - 1)] if message else [b"\0"]
            for variant in variants:
                with self.subTest(name):
                    self.assertFalse(sig.ed25519_verify(public_key, variant, signature))

    def test_a_flipped_public_key_bit_fails(self):
        for name, public_key, message, signature in self.vectors():
            with self.subTest(name):
                self.assertFalse(sig.ed25519_verify(flip_bit(public_key, 3), message, signature))

    def test_s_plus_l_is_refused(self):
        """[S+L]B = [S]B, so only the S < L rule (§5.1.7) tells this second spelling apart."""
        for name, public_key, message, signature in self.vectors():
            scalar_s = int.from_bytes(signature[32:], "little")
            for bad_s in (scalar_s + L, L, 2 ** 256 - 1):
                with self.subTest(name, bad_s=bad_s):
                    bad_signature = signature[:32] + bad_s.to_bytes(32, "little")
                    self.assertFalse(sig.ed25519_verify(public_key, message, bad_signature))

    # The identity (y = 1) as a public key lets these tests make valid signatures without a signer: [k]A is the
    # identity for every k, so R = [S]B verifies for any message. No real key is the identity.
    IDENTITY = (1).to_bytes(32, "little")

    def test_non_canonical_public_key_is_refused(self):
        forged = BASE_POINT_ENCODED + (1).to_bytes(32, "little")  # R = B, S = 1
        self.assertTrue(sig.ed25519_verify(self.IDENTITY, b"any message", forged))  # the canonical spelling
        for what, encoding in (("y = p + 1", P + 1), ("x = 0 with the sign bit", 1 | 1 << 255)):
            with self.subTest(what):
                self.assertFalse(sig.ed25519_verify(encoding.to_bytes(32, "little"), b"any message", forged))

    def test_non_canonical_r_is_refused(self):
        zero_s = bytes(32)  # [0]B - [k]identity is the identity, so R must be the identity
        self.assertTrue(sig.ed25519_verify(self.IDENTITY, b"any message", self.IDENTITY + zero_s))
        for what, encoding in (("y = p + 1", P + 1), ("x = 0 with the sign bit", 1 | 1 << 255)):
            with self.subTest(what):
                bad_r = encoding.to_bytes(32, "little")
                self.assertFalse(sig.ed25519_verify(self.IDENTITY, b"any message", bad_r + zero_s))

    def test_wrong_lengths_are_refused(self):
        _name, public_key, message, signature = next(self.vectors())
        self.assertFalse(sig.ed25519_verify(public_key, message, signature + b"\0"))  # same S if truncated
        self.assertFalse(sig.ed25519_verify(public_key, message, signature[:63]))
        self.assertFalse(sig.ed25519_verify(public_key + b"\0", message, signature))
        self.assertFalse(sig.ed25519_verify(public_key[:31], message, signature))


class RsaEncodingTests(unittest.TestCase):
    """rsa_pkcs1v15_verify's RFC 8017 rules, on a made-up modulus with exponent 1: the "signature" is then the
    encoded block itself, so each test can write exactly the block it wants to present."""

    MODULUS = (1 << 2045) + 1  # 256 bytes, with room above it for signature + modulus
    SIZE = 256

    def block(self, hash_name, message, padding=None, tail=b""):
        prefix = {"sha256": "3031300d060960864801650304020105000420",
                  "sha512": "3051300d060960864801650304020305000440"}[hash_name]
        digest_info = bytes.fromhex(prefix) + hashlib.new(hash_name, message).digest() + tail
        if padding is None:
            padding = b"\xff" * (self.SIZE - 3 - len(digest_info))
        return b"\x00\x01" + padding + b"\x00" + digest_info

    def verify(self, signature, hash_name="sha256", message=b"message"):
        return sig.rsa_pkcs1v15_verify(self.MODULUS, 1, hash_name, message, signature)

    def test_the_correct_block_verifies(self):
        for hash_name in ("sha256", "sha512"):
            with self.subTest(hash_name):
                self.assertTrue(self.verify(self.block(hash_name, b"message"), hash_name))
                self.assertFalse(self.verify(self.block(hash_name, b"other"), hash_name))

    def test_the_hash_must_be_the_named_one(self):
        self.assertFalse(self.verify(self.block("sha256", b"message"), "sha512"))

    def test_signature_plus_modulus_is_refused(self):
        value = int.from_bytes(self.block("sha256", b"message"), "big") + self.MODULUS
        self.assertFalse(self.verify(value.to_bytes(self.SIZE, "big")))

    def test_length_must_be_the_modulus_length(self):
        good = self.block("sha256", b"message")
        self.assertFalse(self.verify(b"\0" + good))
        self.assertFalse(self.verify(good[1:]))  # OpenSSH would pad this back to length; RFC 8017 §8.2.2 does not

    def test_padding_is_compared_not_parsed(self):
        short_padding = b"\xff" * 8
        garbage = b"\x5a" * (self.SIZE - 3 - 8 - 51)
        for what, block in (
                ("garbage after the digest", self.block("sha256", b"message", short_padding, garbage)),
                ("a zero in the padding", self.block("sha256", b"message", b"\xff" * 100 + b"\0" + b"\xff" * 101)),
                ("block type 2", b"\x00\x02" + self.block("sha256", b"message")[2:])):
            with self.subTest(what):
                self.assertEqual(len(block), self.SIZE)
                self.assertFalse(self.verify(block))

    def test_padding_must_be_8_bytes_at_least(self):
        """RFC 8017 §9.2 step 3: a modulus too small for 8 bytes of padding cannot carry a signature."""
        digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(b"message").digest()
        for padding_size, verifies in ((7, False), (8, True)):
            with self.subTest(padding_size=padding_size):
                size = 3 + padding_size + len(digest_info)
                block = b"\x00\x01" + b"\xff" * padding_size + b"\x00" + digest_info
                modulus = (1 << (8 * size - 3)) + 1
                self.assertEqual(sig.rsa_pkcs1v15_verify(modulus, 1, "sha256", b"message", block), verifies)


class AllowedSignersTests(unittest.TestCase):
    """parse_allowed_signers and unsupported_signers on the ssh-keygen(1) ALLOWED SIGNERS format."""

    def test_a_typical_file(self):
        text = ("# signers of OPQ Box updates\x0c\u2028\r\n\r\n"  # only \n ends a line, as for OpenSSH
                "  alice@example.com,carol@example.com %s alice laptop\r\n"
                '"bob the builder@example.com" NameSpaces="opq-box-update,file",Valid-After="20240101" %s\n'
                % (FIXTURE_ED25519_KEY, FIXTURE_RSA_KEY))
        alice, bob = signers_of(text)
        self.assertEqual(alice.principals, ("alice@example.com", "carol@example.com"))
        self.assertEqual((alice.namespaces, alice.valid_after, alice.valid_before), (None, None, None))
        self.assertEqual((alice.key_type, alice.line), ("ssh-ed25519", 3))
        self.assertEqual(alice.key_blob, base64.b64decode(FIXTURE_ED25519_KEY.split()[1]))
        self.assertEqual(bob.principals, ("bob the builder@example.com",))
        self.assertEqual(bob.namespaces, ("opq-box-update", "file"))
        self.assertEqual(bob.valid_after, time.mktime((2024, 1, 1, 0, 0, 0, 0, 0, -1)))
        self.assertEqual((bob.key_type, bob.line), ("ssh-rsa", 4))
        self.assertEqual(sig.unsupported_signers([alice, bob]), [])

    def test_quoted_option_values(self):
        line = 'a@b namespaces="x y,with \\"quote\\"",valid-before="20300101Z" %s' % FIXTURE_ED25519_KEY
        signer, = signers_of(line)
        self.assertEqual(signer.namespaces, ("x y", 'with "quote"'))

    def test_times(self):
        cases = (("20240102Z", (2024, 1, 2, 0, 0, 0)), ("202401020304z", (2024, 1, 2, 3, 4, 0)),
                 ("20240102030405UTC", (2024, 1, 2, 3, 4, 5)))
        for written, utc in cases:
            with self.subTest(written):
                signer, = signers_of('a@b valid-after="%s" %s' % (written, FIXTURE_ED25519_KEY))
                self.assertEqual(signer.valid_after, calendar.timegm(utc + (0, 0, 0)))

    @unittest.skipUnless(hasattr(time, "tzset"), "needs time.tzset to change the local time zone")
    def test_times_without_z_are_local(self):
        saved = os.environ.get("TZ")
        os.environ["TZ"] = "XST+05"  # five hours behind UTC, no daylight saving time
        time.tzset()
        try:
            signer, = signers_of('a@b valid-before="202401020304" %s' % FIXTURE_ED25519_KEY)
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
            time.tzset()
        self.assertEqual(signer.valid_before, calendar.timegm((2024, 1, 2, 8, 4, 0, 0, 0, 0)))

    @unittest.skipUnless(hasattr(time, "tzset"), "needs time.tzset to change the local time zone")
    def test_local_times_in_summer_are_standard_time(self):
        """misc.c parse_absolute_time() leaves tm_isdst 0: mktime(3) reads a summer wall clock as standard time,
        an hour later than the wall clock shows (checked against ssh-keygen in the differential suite)."""
        saved = os.environ.get("TZ")
        os.environ["TZ"] = "CET-1CEST,M3.5.0,M10.5.0/3"    # Central Europe: UTC+1, UTC+2 in summer
        time.tzset()
        try:
            summer, = signers_of('a@b valid-after="20240701120000" %s' % FIXTURE_ED25519_KEY)
            winter, = signers_of('a@b valid-after="20240101120000" %s' % FIXTURE_ED25519_KEY)
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
            time.tzset()
        self.assertEqual(summer.valid_after, calendar.timegm((2024, 7, 1, 11, 0, 0)))
        self.assertEqual(winter.valid_after, calendar.timegm((2024, 1, 1, 11, 0, 0)))

    def test_lines_openssh_skips_are_skipped_with_a_warning_naming_them(self):
        """sshsig.c check_allowed_keys_line() skips a line it cannot read and goes on: so does the server."""
        ed25519_blob = base64.b64decode(FIXTURE_ED25519_KEY.split()[1])
        key = FIXTURE_ED25519_KEY
        cases = (
            ("alice@example.com", "invalid line"),
            ("alice@example.com ssh-ed25519", "missing key"),
            ('alice@example.com namespaces="file"', "missing key"),
            ("alice@example.com ssh-ed25519 AAAA!!!!", "invalid key"),
            ("alice@example.com " + key_line("", "ecdsa-sha2-nistp256", ECDSA_BLOB).rstrip("="), "invalid key"),
            ("alice@example.com " + key.replace("ssh-ed25519", "ssh-rsa"), "written as ssh-rsa"),
            ("alice@example.com " + key_line("", "ssh-ed25519", ed25519_blob[:-1]), "invalid key"),
            ("alice@example.com " + key_line("", "ssh-rsa", RSA_1024_BLOB + b"\0"), "trailing bytes"),
            ("alice@example.com " + key_line("", "ssh-ed25519", ssh_string(b"ssh-ed25519") + ssh_string(bytes(31))),
             "not 32 bytes"),
            ("alice@example.com " + key_line("", "ssh-rsa", rsa_blob(modulus=ssh_string(b"\x80" + bytes(254) + b"\1"))),
             "negative mpint"),
            ("alice@example.com " + key_line("", "ssh-rsa", rsa_blob(modulus=ssh_mpint((1 << 1022) + 1))),
             "RSA key of 1023 bits (OpenSSH reads 1024 to 16384)"),
            ("alice@example.com ssh-foo AAAA", "invalid key"),
            ("*@example.com cert-authority " + key, "cert-authority: certificates are not supported"),
            ("*@example.com CERT-AUTHORITY,namespaces=\"x\" " + key, "cert-authority"),
            ("alice@example.com no-touch-required " + key, "bad options: unknown key option"),
            ("alice@example.com cert-authorityX " + key, "bad options: unknown key option"),
            ("alice@example.com \u0130namespaces=\"x\" " + key, "bad options: unknown key option"),
            ("alice@example.com namespaces\u212a=\"x\" " + key, "bad options: unknown key option"),
            ("alice@example.com namespaces=file " + key, "bad options: missing start quote"),
            ('alice@example.com namespaces="a", ' + key, "bad options: unexpected end-of-options"),
            ('alice@example.com namespaces="a"' + key, "invalid key"),
            ('alice@example.com namespaces="a",namespaces="b" ' + key, 'multiple "namespaces" clauses'),
            ('alice@example.com valid-after="20240101",valid-after="20240102" ' + key, 'multiple "valid-after"'),
            ('alice@example.com namespaces="file ' + key, "invalid options (a quote is not closed)"),
            ('alice@example.com valid-after="2024013" ' + key, 'invalid "valid-after" time'),
            ('alice@example.com valid-after="20241301" ' + key, 'invalid "valid-after" time'),
            ('alice@example.com valid-after="20240132" ' + key, 'invalid "valid-after" time'),
            ('alice@example.com valid-before="202401012400Z" ' + key, 'invalid "valid-before" time'),
            ('alice@example.com valid-before="20240101235962Z" ' + key, 'invalid "valid-before" time'),
            ('alice@example.com valid-before="+2024010Z" ' + key, 'invalid "valid-before" time'),
            ('alice@example.com valid-after="19700101Z" ' + key, 'invalid "valid-after" time: 0 means unset'),
            ('alice@example.com valid-after="19691231Z" ' + key, 'invalid "valid-after" time: before 1970'),
            ('alice@example.com valid-after="08000101Z" ' + key, 'invalid "valid-after" time: before 1970'),
            ('alice@example.com valid-after="20250101",valid-before="20240101" ' + key,
             '"valid-before" time is before "valid-after"'),
            ('alice@example.com valid-after="20240101Z",valid-before="20240101Z" ' + key,
             '"valid-before" time is before "valid-after"'),
            ('"alice@example.com ' + key, "invalid line"),
            ('\r# not a comment: the \\r comes first ' + key, "invalid key"),
        )
        for line, reason in cases:
            with self.subTest(line):
                parsed = sig.parse_allowed_signers("# a comment\n%s\n" % line)
                self.assertEqual(parsed.signers, [])
                warning, = parsed.warnings
                self.assertTrue(warning.startswith("line 2: "), warning)
                self.assertIn(reason, warning)
                self.assertTrue(warning.endswith("; skipped, as ssh-keygen skips it"), warning)

    def test_a_skipped_line_does_not_hide_the_others(self):
        text = "\n".join(("*@x cert-authority " + FIXTURE_ED25519_KEY, 'a@b valid-after="2024" ' + FIXTURE_RSA_KEY,
                          "alice@example.com " + FIXTURE_ED25519_KEY,
                          "bob@example.com unknown-option " + FIXTURE_RSA_KEY))
        parsed = sig.parse_allowed_signers(text)
        self.assertEqual([signer.line for signer in parsed.signers], [3])
        self.assertEqual([warning.split(":")[0] for warning in parsed.warnings], ["line 1", "line 2", "line 4"])

    def test_lines_openssh_reads(self):
        """Spellings OpenSSH 9.2 accepts, each read as it reads them (the differential suite runs ssh-keygen)."""
        key = FIXTURE_ED25519_KEY
        ed25519_blob = base64.b64decode(key.split()[1])
        rsa_key_blob = base64.b64decode(FIXTURE_RSA_KEY.split()[1])
        _, exponent, modulus = read_strings(rsa_key_blob)
        padded_rsa = ssh_string(b"ssh-rsa") + ssh_string(b"\0" + exponent) + ssh_string(b"\0\0" + modulus)
        cases = (   # line, principals, namespaces, (valid_after, valid_before), key blob
            (",alice@example.com " + key, ("", "alice@example.com"), None, (None, None), ed25519_blob),
            ('al"ice bob" ' + key, ("alice bob",), None, (None, None), ed25519_blob),
            ('a"lice b"ob ' + key, None, None, None, None),     # the word ends at the closing quote: "ob" is no key
            ("alice@example.com\t\t" + key + "\tcomment with spaces", ("alice@example.com",), None, (None, None),
             ed25519_blob),
            ("alice@example.com\r" + key + "\r", ("alice@example.com",), None, (None, None), ed25519_blob),
            ('a@b ,namespaces="x",,valid-before="20300101Z" ' + key, ("a@b",), ("x",),
             (None, calendar.timegm((2030, 1, 1, 0, 0, 0))), ed25519_blob),
            ('a@b namespaces="x y,a\\"b" ' + key, ("a@b",), ("x y", 'a"b'), (None, None), ed25519_blob),
            ('a@b namespaces="" ' + key, ("a@b",), ("",), (None, None), ed25519_blob),
            ('a@b NameSpaces="\u00e9,opq-box-update" ' + key, ("a@b",), ("\u00e9", "opq-box-update"), (None, None),
             ed25519_blob),
            ('a@b namespaces="\u212a" ' + key, ("a@b",), ("\u212a",), (None, None), ed25519_blob),
            ('a@b valid-after="20250230Z" ' + key, ("a@b",), None, (calendar.timegm((2025, 3, 2, 0, 0, 0)), None),
             ed25519_blob),
            ('a@b valid-after="2025 1 1Z" ' + key, ("a@b",), None, (calendar.timegm((2025, 1, 1, 0, 0, 0)), None),
             ed25519_blob),
            ('a@b valid-after="20241231235960utc" ' + key, ("a@b",), None,
             (calendar.timegm((2025, 1, 1, 0, 0, 0)), None), ed25519_blob),
            ('a@b valid-after="19700101000001Z" ' + key, ("a@b",), None, (1, None), ed25519_blob),
            ("a@b rsa-sha2-512 " + FIXTURE_RSA_KEY.split()[1], ("a@b",), None, (None, None), rsa_key_blob),
            ("a@b " + key_line("", "ssh-rsa", padded_rsa), ("a@b",), None, (None, None), rsa_key_blob),
            ("a@b ssh-ed25519 " + "\v".join(key.split()[1].partition("AAAA")[1:]), ("a@b",), None, (None, None),
             ed25519_blob),
            ("a@b " + key + "\0 junk after a NUL", ("a@b",), None, (None, None), ed25519_blob),
        )
        for line, principals, namespaces, window, blob in cases:
            with self.subTest(line):
                parsed = sig.parse_allowed_signers(line)
                if principals is None:
                    self.assertEqual((parsed.signers, len(parsed.warnings)), ([], 1))
                    continue
                self.assertEqual(parsed.warnings, [])
                signer, = parsed.signers
                self.assertEqual((signer.principals, signer.namespaces), (principals, namespaces))
                self.assertEqual((signer.valid_after, signer.valid_before), window)
                self.assertEqual(signer.key_blob, blob)

    def test_only_a_line_feed_ends_a_line(self):
        """OpenSSH's getline(): a comment ending in \\r swallows what follows it up to the next \\n."""
        parsed = sig.parse_allowed_signers("# old key, revoked\ralice@example.com %s\nbob@example.com %s\n"
                                           % (FIXTURE_ED25519_KEY, FIXTURE_RSA_KEY))
        self.assertEqual([(signer.principals, signer.line) for signer in parsed.signers],
                         [(("bob@example.com",), 2)])
        self.assertEqual(parsed.warnings, [])

    def test_patterns_as_match_pattern_list(self):
        cases = (   # text, patterns, OpenSSH's answer
            ("ops@example.org", "ops@example.org", 1), ("ops@example.org", "*@example.org", 1),
            ("ops@example.org", "op?@example.org", 1), ("ops@example.org", "o*s*@*.org", 1),
            ("ops@example.org", "!ops@example.org", -1), ("ops@example.org", "*,!ops@example.org", -1),
            ("ops@example.org", "!test@example.org", 0), ("ops@example.org", "!x,ops@example.org", 1),
            ("ops@example.org", "OPS@example.org", 0), ("ops@example.org", "", 0), ("ops@example.org", ",", 0),
            ("ops@example.org", "ops@example.org,", 1), ("", "a,", 0), ("", ",a", 1), ("", "!", -1),
            ("ops@example.org", "ops@example.org," + "x" * 1023, 0), ("ops@example.org", "*," + "x" * 1022, 1),
            ("ops@example.org", "!x" + "x" * 1022 + ",*", 0), ("ops@example.org", "*," + "*" * 5000, 0),
            ("a" * 60, "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", 0), ("\u00e9", "?", 0), ("\u00e9", "??", 1),
        )
        for text, patterns, expected in cases:
            with self.subTest(text=text[:20], patterns=patterns[:40]):
                self.assertEqual(sig._match_pattern_list(text, patterns.split(",")), expected)

    def test_principals_a_box_can_verify_for(self):
        def principal(principals, wanted=()):
            signer, = signers_of("%s %s" % (principals, FIXTURE_ED25519_KEY))
            return sig.signer_principal(signer, wanted)
        self.assertEqual(principal("ops@example.org"), "ops@example.org")
        self.assertEqual(principal("ops@example.org,test@example.org"), "ops@example.org,test@example.org")
        self.assertEqual(principal("*@example.org,!test@example.org"), "*@example.org")
        self.assertIsNone(principal("!ops@example.org"))            # only negations: no -I ever matches
        self.assertIsNone(principal("ops@example.org,!ops@example.org"))
        self.assertEqual(principal("*@example.org", ["test@x", "ops@example.org"]), "ops@example.org")
        self.assertIsNone(principal("test@example.org", ["ops@example.org"]))
        self.assertIsNone(principal("*@example.org,!ops@example.org", ["ops@example.org"]))
        self.assertIsNone(principal("!test@example.org", ["ops@example.org"]))

    def test_validity_in_whole_seconds_and_the_next_boundary(self):
        after, before = calendar.timegm((2024, 1, 1, 0, 0, 0)), calendar.timegm((2025, 1, 1, 0, 0, 0))
        windowed, = signers_of('a@b valid-after="20240101Z",valid-before="20250101Z" ' + FIXTURE_ED25519_KEY)
        open_ended, = signers_of("a@b " + FIXTURE_ED25519_KEY)
        until, = signers_of('a@b valid-before="20260101Z" ' + FIXTURE_ED25519_KEY)
        for moment, valid in ((after - 0.001, False), (after, True), (before, True), (before + 0.999, True),
                              (before + 1, False)):
            with self.subTest(moment=moment):
                self.assertEqual(sig.signer_valid_at(windowed, moment), valid)
                self.assertTrue(sig.signer_valid_at(open_ended, moment))
        signers = [windowed, open_ended, until]
        self.assertEqual(sig.next_validity_boundary(signers, 0), after)
        self.assertEqual(sig.next_validity_boundary(signers, after), before + 1)
        self.assertEqual(sig.next_validity_boundary(signers, before + 0.5), before + 1)
        self.assertEqual(sig.next_validity_boundary(signers, before + 1), calendar.timegm((2026, 1, 1, 0, 0, 1)))
        self.assertIsNone(sig.next_validity_boundary(signers, calendar.timegm((2026, 1, 1, 0, 0, 1))))
        self.assertIsNone(sig.next_validity_boundary([open_ended], 0))

    def test_unsupported_key_types_are_kept_and_warned_about(self):
        text = "\n".join((
            FIXTURE_SIGNERS,
            key_line("ecdsa@example.com", "ecdsa-sha2-nistp256", ECDSA_BLOB),
            key_line("cert@example.com", "ssh-ed25519-cert-v01@openssh.com",
                     ssh_string(b"ssh-ed25519-cert-v01@openssh.com") + ssh_string(bytes(32))),
            key_line("sk@example.com", "sk-ssh-ed25519@openssh.com",
                     ssh_string(b"sk-ssh-ed25519@openssh.com") + ssh_string(bytes(32)) + ssh_string(b"ssh:")),
            key_line("small@example.com", "ssh-rsa", RSA_1024_BLOB)))
        signers = signers_of(text)
        self.assertEqual([signer.line for signer in signers], [1, 2, 4, 5, 6, 7])
        warnings = sig.unsupported_signers(signers)
        self.assertEqual(len(warnings), 4, warnings)
        for warning, expected in zip(warnings, ("line 4: unsupported key type", "line 5: unsupported key type",
                                                "line 6: unsupported key type", "line 7: RSA key of 1024 bits")):
            self.assertTrue(warning.startswith(expected), warning)
            self.assertTrue(warning.endswith("signatures by this key are refused"), warning)


class LoadAllowedSignersTests(unittest.TestCase):
    """load_allowed_signers: the file as OpenSSH reads it, the principals the boxes use, and when it is an error."""

    def setUp(self):
        self.folder = tempfile.mkdtemp(prefix="allowed-signers-test-")
        self.addCleanup(shutil.rmtree, self.folder)
        self.path = os.path.join(self.folder, "allowed_signers")

    def load(self, content, principals=()):
        with open(self.path, "wb") as out:
            out.write(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
        return sig.load_allowed_signers(self.path, principals)

    def assert_unusable(self, content, principals=(), reason="lists no usable key"):
        with self.assertRaises(sig.SettingsError) as caught:
            self.load(content, principals)
        self.assertIn(reason, str(caught.exception))
        self.assertIn(self.path, str(caught.exception))
        return str(caught.exception)

    def test_usable_keys_and_a_warning_for_each_line_that_is_not(self):
        loaded = self.load("ops@example.org cert-authority {0}\n"
                           "ops@example.org {0}\n"
                           'test@example.org valid-after="2025" {1}\n'
                           "test@example.org {1}\n"
                           "ec@example.org {2}\n"
                           "!ops@example.org {0}\n".format(
                               FIXTURE_ED25519_KEY, FIXTURE_RSA_KEY, key_line("", "ecdsa-sha2-nistp256", ECDSA_BLOB)))
        self.assertIsInstance(loaded, sig.AllowedSigners)
        self.assertEqual([signer.line for signer in loaded.signers], [2, 4, 5])
        self.assertEqual([warning.split(":")[0] for warning in loaded.warnings],
                         ["line 1", "line 3", "line 5", "line 6"])
        self.assertIn("cert-authority", loaded.warnings[0])
        self.assertIn('invalid "valid-after" time', loaded.warnings[1])
        self.assertIn("unsupported key type", loaded.warnings[2])
        self.assertIn("listed for '!ops@example.org', which no ssh-keygen -Y verify -I matches", loaded.warnings[3])

    def test_principals_the_boxes_verify_with(self):
        text = "ops@example.org %s\n*@test.example.org %s\n" % (FIXTURE_ED25519_KEY, FIXTURE_RSA_KEY)
        loaded = self.load(text, ["ops@example.org"])
        self.assertEqual([signer.line for signer in loaded.signers], [1])
        self.assertEqual(loaded.warnings, ["line 2: listed for '*@test.example.org', which ssh-keygen -Y verify -I "
                                           "ops@example.org never matches; ignored"])
        self.assertEqual([signer.line for signer in self.load(text, ["a@test.example.org"]).signers], [2])
        self.assertEqual(len(self.load(text, ["x@y", "a@test.example.org", "ops@example.org"]).signers), 2)
        self.assertEqual(len(self.load(text).signers), 2)
        self.assert_unusable(text, ["nobody@example.org"])

    def test_a_file_with_no_usable_key_is_an_error(self):
        self.assert_unusable("")
        self.assert_unusable("# only a comment\n\n")
        message = self.assert_unusable("ops@example.org cert-authority %s\n" % FIXTURE_ED25519_KEY)
        self.assertIn("line 1: cert-authority", message)
        self.assert_unusable("ec@example.org %s\n" % key_line("", "ecdsa-sha2-nistp256", ECDSA_BLOB))
        self.assert_unusable("small@example.org %s\n" % key_line("", "ssh-rsa", RSA_1024_BLOB))
        self.assert_unusable("!ops@example.org %s\n" % FIXTURE_ED25519_KEY)
        self.assert_unusable("# revoked\rops@example.org %s\n" % FIXTURE_ED25519_KEY)   # not universal newlines
        with self.assertRaises(sig.SettingsError) as caught:
            sig.load_allowed_signers(os.path.join(self.folder, "missing"))
        self.assertIn("cannot be read: No such file or directory", str(caught.exception))
        with self.assertRaises(sig.SettingsError) as caught:
            sig.load_allowed_signers(self.folder)
        self.assertIn("cannot be read", str(caught.exception))

    def test_bytes_that_are_not_utf_8_do_not_matter(self):
        loaded = self.load(b"# \xff\xfe Latin-1 comment\n\xe9@example.org " + FIXTURE_ED25519_KEY.encode() + b"\n"
                           + b"ops@example.org " + FIXTURE_ED25519_KEY.encode())
        self.assertEqual([signer.line for signer in loaded.signers], [2, 3])


class SignerPrincipalsSettingTests(unittest.TestCase):
    """signer_principals in BOX_UPDATE_SERVER_SETTINGS."""

    def test_read_and_checked(self):
        settings, warnings = sig.parse_settings('{"port": 80, "updates_dir": "/u"}')
        self.assertEqual(settings.signer_principals, ())
        settings, warnings = sig.parse_settings(
            '{"port": 80, "updates_dir": "/u", "signer_principals": ["ops@example.org", "*"]}')
        self.assertEqual((settings.signer_principals, warnings), (("ops@example.org", "*"), []))
        for value in ('"ops@example.org"', '[""]', "[7]", '["a\\nb"]', '["a\\u0000b"]', "{}"):
            with self.subTest(value):
                with self.assertRaises(sig.SettingsError) as caught:
                    sig.parse_settings('{"port": 80, "updates_dir": "/u", "signer_principals": %s}' % value)
                self.assertIn("signer_principals must be a list of principal names", str(caught.exception))


class ParseSshsigTests(unittest.TestCase):
    """parse_sshsig on PROTOCOL.sshsig armor and blobs."""

    def setUp(self):
        self.signature = sig.parse_sshsig(FIXTURE_ED25519_SIGNATURE)

    def assert_refused(self, armored, reason):
        with self.assertRaises(sig.SignatureError) as caught:
            sig.parse_sshsig(armored)
        self.assertTrue(str(caught.exception).startswith(reason), str(caught.exception))

    def test_fields(self):
        self.assertEqual(self.signature.public_key, base64.b64decode(FIXTURE_ED25519_KEY.split()[1]))
        self.assertEqual((self.signature.namespace, self.signature.hash_algorithm), (NAMESPACE, "sha512"))
        algorithm, raw_signature = read_strings(self.signature.signature)
        self.assertEqual((algorithm, len(raw_signature)), (b"ssh-ed25519", 64))

    def test_what_sshsig_dearmor_accepts(self):
        """OpenSSH sshsig_dearmor(): white space inside the base64 is skipped, what follows END is not read."""
        lines = FIXTURE_ED25519_SIGNATURE.split(b"\n")
        body = b"\n".join(lines[1:-2])
        accepted = (
            rearmored(self.signature).replace(b"\n", b"\n\n"),
            lines[0] + b"\n" + body.replace(b"\n", b"\r\n") + b"\r\n" + lines[-2] + b"\r\n",  # CRLF but the BEGIN
            lines[0] + b"\n" + body.replace(b"\n", b" \t\n\x0b\x0c ") + b"\n" + lines[-2],
            lines[0] + b"\n" + body + b"\n" + lines[-2] + b"trailing text, never read\n\x00\xff",
            lines[0] + b"\n" + body + b"\x00\n" + lines[-2] + b"\n",       # a NUL as the last byte
            FIXTURE_ED25519_SIGNATURE.replace(b"DA==", b"DA= =  "),
        )
        for armored in accepted:
            with self.subTest(armored=armored[-60:]):
                self.assertEqual(sig.parse_sshsig(armored), self.signature)

    def test_what_sshsig_dearmor_refuses(self):
        """Each variant ssh-keygen -Y verify refuses ("Couldn't parse signature"), refused with its reason."""
        lines = FIXTURE_ED25519_SIGNATURE.split(b"\n")
        body = b"\n".join(lines[1:-2])
        cases = (
            (FIXTURE_ED25519_SIGNATURE.replace(b"\n", b"\r\n"), "the BEGIN line ends in CR LF"),
            (b"\n" + FIXTURE_ED25519_SIGNATURE, "something (a blank line, spaces) before the BEGIN line"),
            (b"  " + FIXTURE_ED25519_SIGNATURE, "something (a blank line, spaces) before the BEGIN line"),
            (FIXTURE_ED25519_SIGNATURE.replace(b"-----\n", b"----- \n", 1), "space or tab after the BEGIN line"),
            (FIXTURE_ED25519_SIGNATURE.replace(b"-----\n", b"-----\t\n", 1), "space or tab after the BEGIN line"),
            (lines[0] + b"\n" + body + b"\n  " + lines[-2] + b"\n", "the END line is indented"),
            (lines[0] + b"\n" + body + b"\n\t" + lines[-2] + b"\n", "the END line is indented"),
            (lines[0] + b"\n" + body + b" " + lines[-2] + b"\n", "no END line"),
            (lines[0] + b"\n" + lines[-2] + b"\n", "no END line"),
            (lines[0] + b"\n" + body.replace(b"\n", b"\x00\n", 1) + b"\n" + lines[-2], "NUL byte"),
            (FIXTURE_ED25519_SIGNATURE.lower(), "no BEGIN line"),
        )
        for armored, reason in cases:
            with self.subTest(reason=reason, armored=armored[:40]):
                self.assert_refused(armored, "malformed armor: " + reason)

    def test_other_widths(self):
        blob = base64.b64decode(b"".join(FIXTURE_ED25519_SIGNATURE.split(b"\n")[1:-2]))
        self.assertEqual(sig.parse_sshsig(armor(blob, width=76)), self.signature)

    def test_broken_armor(self):
        lines = FIXTURE_ED25519_SIGNATURE.split(b"\n")
        cases = (
            (FIXTURE_ED25519_SIGNATURE[:len(FIXTURE_ED25519_SIGNATURE) // 2], "malformed armor: no END line"),
            (b"\n".join(lines[:-2]), "malformed armor: no END line"),
            (b"\n".join(lines[1:]), "malformed armor: no BEGIN line"),
            (b"", "malformed armor: no BEGIN line"),
            (b"\n".join(lines[:2] + lines[3:]), "malformed armor: bad base64"),
            (FIXTURE_ED25519_SIGNATURE.replace(b"AAAAL", b"AA*AL", 1), "malformed armor: bad base64"),
            (FIXTURE_ED25519_SIGNATURE.replace(b"DA==", b"DA="), "malformed armor: bad base64"),
            (FIXTURE_ED25519_SIGNATURE.replace(b"DA==", b"DB=="), "malformed armor: bad base64"),  # stray bits
            (FIXTURE_ED25519_SIGNATURE.replace(b"SSH SIGNATURE-----\n", "SSH SIGNATURE-----\n\u00e9".encode(), 1),
             "malformed armor: bad base64"),
            (b"-----BEGIN SSH SIGNATURE-----\n" + b"A" * (10 * 1024 * 1024), "malformed armor: more than"),
            (FIXTURE_ED25519_SIGNATURE + b" " * sig.MAX_SIGNATURE_BYTES, "malformed armor: more than"),
        )
        for armored, reason in cases:
            with self.subTest(reason=reason, start=armored[:40]):
                self.assert_refused(armored, reason)

    def test_malformed_blobs(self):
        fields = (self.signature.public_key, NAMESPACE, "sha512", self.signature.signature)
        good = sshsig_blob(*fields)
        self.assertEqual(sig.parse_sshsig(armor(good)), self.signature)
        # sshsig_parse_preamble() refuses only versions above 1: a version 0 rewrap verifies with ssh-keygen too
        self.assertEqual(sig.parse_sshsig(armor(sshsig_blob(*fields, version=0))), self.signature)
        cases = (
            (sshsig_blob(*fields, magic=b"SSHSIH"), "malformed signature: no SSHSIG preamble"),
            (sshsig_blob(*fields, version=2), "malformed signature: version 2"),
            (good + b"\0", "malformed signature: trailing bytes"),
            (good[:-1], "malformed signature: truncated"),
            (good[:5], "malformed signature: truncated"),
            (good[:30], "malformed signature: truncated"),
            (sshsig_blob(fields[0], "", "sha512", fields[3]), "malformed signature: empty namespace"),
            (sshsig_blob(fields[0], "opq\0box", "sha512", fields[3]), "malformed signature: NUL in a text field"),
            (sshsig_blob(fields[0], NAMESPACE, "sha512", fields[3]).replace(b"opq", b"\xffpq"),
             "malformed signature: text field is not UTF-8"),
            (sshsig_blob(fields[0], NAMESPACE, "md5", fields[3]), "unsupported hash algorithm 'md5'"),
            (sshsig_blob(fields[0], NAMESPACE, "SHA512", fields[3]), "unsupported hash algorithm"),
        )
        for blob, reason in cases:
            with self.subTest(reason):
                self.assert_refused(armor(blob), reason)


class VerifyTests(unittest.TestCase):
    """verify_sshsig on the fixed ssh-keygen signatures: each reason for a refusal."""

    def setUp(self):
        self.signers = signers_of(FIXTURE_SIGNERS)
        self.ed25519 = sig.parse_sshsig(FIXTURE_ED25519_SIGNATURE)
        self.rsa = sig.parse_sshsig(FIXTURE_RSA_SIGNATURE)

    def verify(self, signature, signers=None, message=FIXTURE_MESSAGE, namespace=NAMESPACE, now=None):
        signers = self.signers if signers is None else signers
        return sig.verify_sshsig(signature, digest_of(signature, message), signers, namespace, now)

    def assert_refused(self, reason, *args, **kwargs):
        with self.assertRaises(sig.SignatureError) as caught:
            self.verify(*args, **kwargs)
        self.assertEqual(str(caught.exception), reason)

    def signers_with(self, options, key=FIXTURE_ED25519_KEY):
        return signers_of("alice@example.com %s %s" % (options, key))

    def test_the_fixtures_verify(self):
        self.assertEqual(self.verify(self.ed25519), "alice@example.com")
        self.assertEqual(self.verify(self.rsa), "bob@example.com")
        self.assertEqual(self.verify(self.ed25519, self.signers_with('namespaces="file,opq-box-update"')),
                         "alice@example.com")

    def test_other_bytes_are_refused(self):
        for signature, line in ((self.ed25519, 1), (self.rsa, 2)):
            self.assert_refused("bad signature (allowed_signers line %d)" % line, signature,
                                message=FIXTURE_MESSAGE + b"x")

    def test_a_flipped_signature_bit_is_refused(self):
        for signature, line in ((self.ed25519, 1), (self.rsa, 2)):
            algorithm, raw = read_strings(signature.signature)
            for bit in (0, 100, 8 * len(raw) - 1):
                with self.subTest(algorithm, bit=bit):
                    changed = ssh_string(algorithm) + ssh_string(flip_bit(raw, bit))
                    self.assert_refused("bad signature (allowed_signers line %d)" % line,
                                        signature._replace(signature=changed))

    def test_s_plus_l_is_refused(self):
        """OpenSSH 9.2's ssh-keygen accepts this second spelling of the fixture (it checks only S's top 3 bits)."""
        raw = read_strings(self.ed25519.signature)[1]
        scalar_s = int.from_bytes(raw[32:], "little") + L
        changed = ssh_string(b"ssh-ed25519") + ssh_string(raw[:32] + scalar_s.to_bytes(32, "little"))
        self.assert_refused("bad signature" + LINE_1, self.ed25519._replace(signature=changed))

    def test_s_equal_to_l_is_refused(self):
        """RFC 8032 §5.1.7: S must be below L.  With the small-order key A = R = identity, S = L passes the
        group equation ([L]B = identity = R + [k]A), so only the S < L check refuses it (and S = L - 1 fails)."""
        identity = (1).to_bytes(32, "little")          # the point (0, 1)
        for scalar_s, verifies in ((L, False), (0, True), (L - 1, False)):
            with self.subTest(scalar_s=scalar_s):
                self.assertEqual(sig.ed25519_verify(identity, b"message", identity + scalar_s.to_bytes(32, "little")),
                                 verifies)

    def test_the_namespace_is_checked_first(self):
        self.assert_refused("signed for namespace 'opq-box-update', not 'file'", self.ed25519, namespace="file")
        self.assert_refused("signed for namespace 'opq-box-update', not 'file'", self.ed25519, [], namespace="file")

    def test_an_unlisted_key_is_refused(self):
        rfc_key = bytes.fromhex(RFC_8032_VECTORS[0][1])
        others = signers_of(key_line("x@y", "ssh-ed25519", ssh_string(b"ssh-ed25519") + ssh_string(rfc_key)))
        self.assert_refused("no listed key made this signature", self.ed25519, others)
        self.assert_refused("no listed key made this signature", self.ed25519, [])
        self.assert_refused("no listed key made this signature", self.rsa, self.signers[:1])

    def test_namespace_restrictions(self):
        for options in ('namespaces="other"', 'namespaces="*,!opq-box-update"', 'namespaces="opq-box-update2"'):
            with self.subTest(options):
                self.assert_refused("the key is not allowed for namespace 'opq-box-update'" + LINE_1, self.ed25519,
                                    self.signers_with(options))
        for options in ('namespaces="opq-*"', 'namespaces="file,opq-box-?pdate"', 'namespaces="!file,*"'):
            with self.subTest(options):
                self.assertEqual(self.verify(self.ed25519, self.signers_with(options)), "alice@example.com")

    def test_validity_window(self):
        signers = self.signers_with('valid-after="20240101Z",valid-before="20250101Z"')
        after, before = calendar.timegm((2024, 1, 1, 0, 0, 0)), calendar.timegm((2025, 1, 1, 0, 0, 0))
        for moment in (after, before, before + 0.999, (after + before) / 2):  # whole seconds, as OpenSSH
            self.assertEqual(self.verify(self.ed25519, signers, now=moment), "alice@example.com")
        for moment in (after - 1, after - 0.001, before + 1, time.time()):
            with self.subTest(moment=moment):
                self.assert_refused("the key is outside its valid-after/valid-before window" + LINE_1, self.ed25519,
                                    signers, now=moment)
        past = self.signers_with('valid-before="20200101"')
        self.assert_refused("the key is outside its valid-after/valid-before window" + LINE_1, self.ed25519, past)

    def test_the_first_usable_listing_of_a_key_wins(self):
        text = ('old@example.com namespaces="file" {0}\nnew@example.com {0}\nnewer@example.com {0}\n'
                .format(FIXTURE_ED25519_KEY))
        self.assertEqual(self.verify(self.ed25519, signers_of(text)), "new@example.com")
        text = 'a@b namespaces="file" {0}\nc@d valid-before="20000101" {0}\n'.format(FIXTURE_ED25519_KEY)
        self.assert_refused("the key is not allowed for namespace 'opq-box-update' (allowed_signers line 1); "
                            "the key is outside its valid-after/valid-before window (allowed_signers line 2)",
                            self.ed25519, signers_of(text))

    def test_signature_algorithm_must_suit_the_key(self):
        ed25519_raw = read_strings(self.ed25519.signature)[1]
        rsa_raw = read_strings(self.rsa.signature)[1]
        cases = (
            (self.ed25519, ssh_string(b"rsa-sha2-512") + ssh_string(ed25519_raw), "'rsa-sha2-512'"),
            (self.ed25519, ssh_string(b"ssh-ed448") + ssh_string(ed25519_raw), "'ssh-ed448'"),
            (self.rsa, ssh_string(b"ssh-rsa") + ssh_string(rsa_raw), "'ssh-rsa'"),  # SHA-1
            (self.rsa, ssh_string(b"ssh-ed25519") + ssh_string(rsa_raw), "'ssh-ed25519'"),
        )
        for signature, changed, algorithm in cases:
            with self.subTest(algorithm):
                self.assert_refused("signature algorithm %s is not accepted (allowed_signers line %d)"
                                    % (algorithm, 1 if signature is self.ed25519 else 2),
                                    signature._replace(signature=changed))

    def test_the_rsa_signature_hash_is_independent_of_the_message_hash(self):
        """ssh-keygen pairs sha512 with rsa-sha2-512, but PROTOCOL.sshsig allows either RSA algorithm."""
        algorithm, raw = read_strings(self.rsa.signature)
        self.assertEqual(algorithm, b"rsa-sha2-512")
        relabelled = self.rsa._replace(signature=ssh_string(b"rsa-sha2-256") + ssh_string(raw))
        # the label picks the hash that is checked
        self.assert_refused("bad signature (allowed_signers line 2)", relabelled)

    def test_the_policy_and_the_cryptography_apart(self):
        """check_allowed_signers (sshsig_check_allowed_keys) picks the line; verify_signature (sshsig_wrap_verify)
        checks the signature whoever made it."""
        text = 'a@b namespaces="file" {0}\nc@d {0}\n'.format(FIXTURE_ED25519_KEY)
        signer, principal = sig.check_allowed_signers(self.ed25519.public_key, signers_of(text), NAMESPACE,
                                                      time.time())
        self.assertEqual((signer.line, principal), (2, "c@d"))
        with self.assertRaises(sig.SignatureError) as caught:
            sig.check_allowed_signers(self.ed25519.public_key, signers_of(text), NAMESPACE, time.time(), ["a@b"])
        self.assertEqual(str(caught.exception), "the key is not allowed for namespace 'opq-box-update' "
                                                "(allowed_signers line 1); the key is listed for 'c@d', not for "
                                                "'a@b' (allowed_signers line 2)")
        self.assertEqual(sig.allowed_signer_refusal(signer, "file", time.time(), ["x@y"]),
                         "the key is listed for 'c@d', not for 'x@y'")
        self.assertIsNone(sig.allowed_signer_refusal(signer, "file", time.time()))
        sig.verify_signature(self.ed25519, digest_of(self.ed25519, FIXTURE_MESSAGE), NAMESPACE)   # no keys needed
        with self.assertRaises(sig.SignatureError) as caught:
            sig.verify_signature(self.ed25519, digest_of(self.ed25519, b"other"), NAMESPACE)
        self.assertEqual(str(caught.exception), "bad signature")

    def test_principals_the_boxes_verify_for(self):
        """ssh-keygen -Y verify -I <principal>: only a line whose principals match it can allow the signature."""
        def verify(principals, listed="alice@example.com"):
            return sig.verify_sshsig(self.ed25519, digest_of(self.ed25519, FIXTURE_MESSAGE),
                                     signers_of("%s %s" % (listed, FIXTURE_ED25519_KEY)), NAMESPACE,
                                     principals=principals)
        self.assertEqual(verify(["alice@example.com"]), "alice@example.com")
        self.assertEqual(verify(["x@y", "alice@example.com"]), "alice@example.com")
        self.assertEqual(verify(["alice@example.com"], "*@example.com"), "alice@example.com")
        self.assertEqual(verify([], "*@example.com,!bob@example.com"), "*@example.com")
        for principals, listed, reason in (
                (["bob@example.com"], "alice@example.com",
                 "the key is listed for 'alice@example.com', not for 'bob@example.com'"),
                (["bob@example.com", "carol@example.com"], "*@example.com,!bob@example.com,!carol@example.com",
                 "the key is listed for '*@example.com,!bob@example.com,!carol@example.com', not for "
                 "'bob@example.com', 'carol@example.com'"),
                ([], "!alice@example.com", "the key is listed for no principal")):
            with self.subTest(listed):
                with self.assertRaises(sig.SignatureError) as caught:
                    verify(principals, listed)
                self.assertEqual(str(caught.exception), reason + LINE_1)

    def test_malformed_signature_blobs(self):
        raw = read_strings(self.ed25519.signature)[1]
        for what, changed in (("trailing data", self.ed25519.signature + b"\0"),
                              ("truncated", self.ed25519.signature[:-1]),
                              ("empty", b"")):
            with self.subTest(what):
                with self.assertRaises(sig.SignatureError) as caught:
                    self.verify(self.ed25519._replace(signature=changed))
                self.assertTrue(str(caught.exception).startswith("malformed signature: "))
        short = ssh_string(b"ssh-ed25519") + ssh_string(raw[:63])
        self.assert_refused("bad signature" + LINE_1, self.ed25519._replace(signature=short))

    def test_an_rsa_signature_shorter_than_the_modulus_is_padded_as_openssh_pads_it(self):
        """ssh-rsa.c ssh_rsa_verify(): a signature with its leading zero bytes left off still verifies."""
        modulus, exponent, private = small_rsa_key()
        key_blob = ssh_string(b"ssh-rsa") + ssh_mpint(exponent) + ssh_mpint(modulus)
        signer = signers_of(key_line("r@x", "ssh-rsa", key_blob))
        for attempt in range(4000):     # a digest whose signature starts with a zero byte: 1 in 256
            digest = hashlib.sha512(b"%d" % attempt).digest()
            signed = (b"SSHSIG" + ssh_string(NAMESPACE.encode()) + ssh_string(b"") + ssh_string(b"sha512")
                      + ssh_string(digest))
            digest_info = bytes.fromhex("3051300d060960864801650304020305000440") + hashlib.sha512(signed).digest()
            block = b"\0\1" + b"\xff" * (256 - 3 - len(digest_info)) + b"\0" + digest_info
            raw = pow(int.from_bytes(block, "big"), private, modulus).to_bytes(256, "big")
            if raw[0] == 0:
                break
        signature = sig.SshSignature(key_blob, NAMESPACE, "sha512", ssh_string(b"rsa-sha2-512") + ssh_string(raw))
        self.assertEqual(sig.verify_sshsig(signature, digest, signer, NAMESPACE), "r@x")
        stripped = signature._replace(signature=ssh_string(b"rsa-sha2-512") + ssh_string(raw[1:]))
        self.assertEqual(sig.verify_sshsig(stripped, digest, signer, NAMESPACE), "r@x")
        longer = signature._replace(signature=ssh_string(b"rsa-sha2-512") + ssh_string(b"\0" + raw))
        with self.assertRaises(sig.SignatureError):
            sig.verify_sshsig(longer, digest, signer, NAMESPACE)

    def test_reserved_field_is_ignored(self):
        """PROTOCOL.sshsig §2: ignore it; ssh-keygen accepts such a signature too."""
        blob = sshsig_blob(self.ed25519.public_key, NAMESPACE, "sha512", self.ed25519.signature, reserved=b"tag")
        self.assertEqual(self.verify(sig.parse_sshsig(armor(blob))), "alice@example.com")

    def test_unsupported_keys_are_refused(self):
        signers = signers_of(key_line("e@x", "ecdsa-sha2-nistp256", ECDSA_BLOB) + "\n"
                             + key_line("r@x", "ssh-rsa", RSA_1024_BLOB))
        dummy = ssh_string(b"rsa-sha2-512") + ssh_string(bytes(128))
        ecdsa = self.ed25519._replace(public_key=ECDSA_BLOB, signature=dummy)
        self.assert_refused("unsupported key type 'ecdsa-sha2-nistp256'" + LINE_1, ecdsa, signers)
        small_rsa = self.ed25519._replace(public_key=RSA_1024_BLOB, signature=dummy)
        self.assert_refused("RSA key of 1024 bits is too small (2048 at least) (allowed_signers line 2)", small_rsa,
                            signers)

    def test_the_digest_must_fit_the_hash(self):
        with self.assertRaises(ValueError):
            sig.verify_sshsig(self.ed25519, hashlib.sha256(FIXTURE_MESSAGE).digest(), self.signers, NAMESPACE)


@unittest.skipIf(SSH_KEYGEN is None, "ssh-keygen is not installed: live OpenSSH round trips skipped")
class SshKeygenTests(unittest.TestCase):
    """Keys and signatures made by the installed ssh-keygen, and ssh-keygen's own verdict on the same input."""

    @classmethod
    def setUpClass(cls):
        cls.directory = tempfile.mkdtemp(prefix="sshsig-test-")
        cls.environment = {name: value for name, value in os.environ.items() if name != "SSH_AUTH_SOCK"}
        cls.message = os.urandom(200000)
        cls.keys = {}
        for name, arguments in (("ed25519", ["-t", "ed25519"]), ("rsa2048", ["-t", "rsa", "-b", "2048"]),
                                ("rsa3072", ["-t", "rsa", "-b", "3072"]), ("rsa1024", ["-t", "rsa", "-b", "1024"]),
                                ("ecdsa", ["-t", "ecdsa"])):
            path = os.path.join(cls.directory, name)
            made = cls.run_keygen(["-q", "-N", "", "-C", name, "-f", path] + arguments)
            if made.returncode == 0:
                with open(path + ".pub", encoding="ascii") as public:
                    cls.keys[name] = (path, " ".join(public.read().split()[:2]))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory)

    @classmethod
    def run_keygen(cls, arguments, stdin=b""):
        return subprocess.run([SSH_KEYGEN] + arguments, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=cls.environment, timeout=120, check=False)

    def key(self, name):
        if name not in self.keys:
            self.skipTest("this ssh-keygen does not make %s keys" % name)
        return self.keys[name]

    def sign(self, name, namespace=NAMESPACE, hash_algorithm=None):
        options = ["-O", "hashalg=" + hash_algorithm] if hash_algorithm else []
        signed = self.run_keygen(["-Y", "sign", "-n", namespace, "-f", self.key(name)[0]] + options, self.message)
        if signed.returncode != 0 and hash_algorithm:
            self.skipTest("this ssh-keygen has no -O hashalg: " + signed.stderr.decode(errors="replace"))
        self.assertEqual(signed.returncode, 0, signed.stderr)
        return signed.stdout

    def write(self, name, content):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as output:
            output.write(content)
        return path

    def keygen_accepts(self, allowed_signers, principal, armored, message=None):
        signature_path = self.write("check.sig", armored)
        allowed_path = self.write("allowed_signers", allowed_signers.encode())
        checked = self.run_keygen(["-Y", "verify", "-f", allowed_path, "-I", principal, "-n", NAMESPACE,
                                   "-s", signature_path], self.message if message is None else message)
        return checked.returncode == 0

    def ours(self, allowed_signers, armored, message=None):
        """verify_sshsig's answer: the principals, or the SignatureError's reason."""
        signature = sig.parse_sshsig(armored)
        try:
            return sig.verify_sshsig(signature, digest_of(signature, self.message if message is None else message),
                                     signers_of(allowed_signers), NAMESPACE)
        except sig.SignatureError as error:
            return "refused: %s" % error

    def test_round_trips(self):
        for name in ("ed25519", "rsa2048", "rsa3072"):
            for hash_algorithm in ("sha256", "sha512"):
                with self.subTest(name, hash_algorithm=hash_algorithm):
                    armored = self.sign(name, hash_algorithm=hash_algorithm)
                    allowed = "signer@example.com %s\n" % self.key(name)[1]
                    self.assertEqual(sig.parse_sshsig(armored).hash_algorithm, hash_algorithm)
                    self.assertEqual(self.ours(allowed, armored), "signer@example.com")
                    self.assertTrue(self.keygen_accepts(allowed, "signer@example.com", armored))
                    other_message = flip_bit(self.message, 12345)
                    self.assertEqual(self.ours(allowed, armored, other_message), "refused: bad signature" + LINE_1)
                    self.assertFalse(self.keygen_accepts(allowed, "signer@example.com", armored, other_message))

    def test_flipped_signature_bits(self):
        for name in ("ed25519", "rsa3072"):
            signature = sig.parse_sshsig(self.sign(name))
            algorithm, raw = read_strings(signature.signature)
            allowed = "signer@example.com %s\n" % self.key(name)[1]
            for bit in (5, 8 * len(raw) - 9):
                with self.subTest(name, bit=bit):
                    changed = rearmored(signature, signature=ssh_string(algorithm) + ssh_string(flip_bit(raw, bit)))
                    self.assertEqual(self.ours(allowed, changed), "refused: bad signature" + LINE_1)
                    self.assertFalse(self.keygen_accepts(allowed, "signer@example.com", changed))

    def test_rsa_signature_algorithm(self):
        """Before OpenSSH 10.0 ssh-keygen signs with rsa-sha2-512 whatever the hash; from 10.0 on, it matches."""
        for hash_algorithm in ("sha256", "sha512"):
            armored = self.sign("rsa2048", hash_algorithm=hash_algorithm)
            algorithm, raw = read_strings(sig.parse_sshsig(armored).signature)
            self.assertIn(algorithm, (b"rsa-sha2-512", ("rsa-sha2-" + hash_algorithm[3:]).encode()))
            self.assertEqual(len(raw), 256)  # always the modulus length: ssh-keygen pads with leading zeros

    def test_refusals_agree_with_ssh_keygen(self):
        key = self.key("ed25519")[1]
        hour = 3600

        def local(moment):
            return time.strftime("%Y%m%d%H%M", time.localtime(moment))

        armored = self.sign("ed25519")
        cases = (
            ("other@example.com %s\n" % self.key("rsa2048")[1], "refused: no listed key made this signature"),
            ('signer@example.com namespaces="other" %s\n' % key,
             "refused: the key is not allowed for namespace 'opq-box-update'" + LINE_1),
            ('signer@example.com valid-before="%s" %s\n' % (local(time.time() - hour), key),
             "refused: the key is outside its valid-after/valid-before window" + LINE_1),
            ('signer@example.com valid-after="%s" %s\n' % (local(time.time() + 2 * hour), key),
             "refused: the key is outside its valid-after/valid-before window" + LINE_1),
            ('signer@example.com valid-after="%s",valid-before="%s" %s\n'
             % (local(time.time() - hour), local(time.time() + 2 * hour), key), "signer@example.com"),
        )
        for allowed, expected in cases:
            with self.subTest(allowed.split(" ")[1]):
                self.assertEqual(self.ours(allowed, armored), expected)
                principal = allowed.split(" ")[0]
                self.assertEqual(self.keygen_accepts(allowed, principal, armored), not expected.startswith("refused"))

    def test_other_namespace(self):
        armored = self.sign("ed25519", namespace="file")
        allowed = "signer@example.com %s\n" % self.key("ed25519")[1]
        self.assertEqual(self.ours(allowed, armored), "refused: signed for namespace 'file', not 'opq-box-update'")
        self.assertFalse(self.keygen_accepts(allowed, "signer@example.com", armored))

    def test_quoted_principals_agree_with_find_principals(self):
        armored = self.sign("ed25519")
        allowed = '# comment\n"the signer@example.com,x@y" %s comment\n' % self.key("ed25519")[1]
        self.assertEqual(self.ours(allowed, armored), "the signer@example.com,x@y")
        found = self.run_keygen(["-Y", "find-principals", "-f", self.write("allowed_signers", allowed.encode()),
                                 "-s", self.write("check.sig", armored)])
        self.assertEqual(found.stdout.decode().split("\n"), ["the signer@example.com", "x@y", ""])

    def test_rsa_1024_is_too_small(self):
        armored = self.sign("rsa1024")
        allowed = "small@example.com %s\n" % self.key("rsa1024")[1]
        self.assertEqual(self.ours(allowed, armored),
                         "refused: RSA key of 1024 bits is too small (2048 at least)" + LINE_1)
        self.assertEqual(len(sig.unsupported_signers(signers_of(allowed))), 1)
        self.assertTrue(self.keygen_accepts(allowed, "small@example.com", armored))  # OpenSSH's floor is 1024

    def test_ecdsa_is_unsupported(self):
        armored = self.sign("ecdsa")
        allowed = "ec@example.com %s\n" % self.key("ecdsa")[1]
        self.assertEqual(self.ours(allowed, armored), "refused: unsupported key type 'ecdsa-sha2-nistp256'" + LINE_1)
        warnings = sig.unsupported_signers(signers_of(allowed))
        self.assertEqual(warnings, ["line 1: unsupported key type 'ecdsa-sha2-nistp256'; "
                                    "signatures by this key are refused"])
        self.assertTrue(self.keygen_accepts(allowed, "ec@example.com", armored))


@unittest.skipIf(SSH_KEYGEN is None, "ssh-keygen is not installed: signed publication through the server skipped")
class SignedUpdatesTest(TempDirTestCase):
    """Through the real server, with allowed_signers set: only what a listed key signed offline is offered."""

    @classmethod
    def setUpClass(cls):
        cls.keys_folder = tempfile.mkdtemp(prefix="box-update-keys-")
        cls.environment = {name: value for name, value in os.environ.items() if name != "SSH_AUTH_SOCK"}
        cls.keys = {}
        for name, arguments in (("ed25519", ["-t", "ed25519"]), ("rsa", ["-t", "rsa", "-b", "3072"]),
                                ("stranger", ["-t", "ed25519"]), ("ecdsa", ["-t", "ecdsa"])):
            path = os.path.join(cls.keys_folder, name)
            subprocess.run([SSH_KEYGEN, "-q", "-N", "", "-C", name, "-f", path] + arguments, check=True,
                           env=cls.environment, timeout=120)
            with open(path + ".pub") as public:
                cls.keys[name] = (path, " ".join(public.read().split()[:2]))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.keys_folder)

    def setUp(self):
        super().setUp()
        self.staging = os.path.join(self.tmp, "staging")
        os.mkdir(self.staging)
        self.allowed = os.path.join(self.tmp, "allowed_signers")
        self.write_allowed("ops@example.org %s\n" % self.keys["ed25519"][1],
                           'rsa-ops@example.org namespaces="opq-box-update" %s\n' % self.keys["rsa"][1])

    def write_allowed(self, *lines):
        with open(self.allowed, "w") as allowed:
            allowed.write("# operators who sign OPQ Box updates\n" + "".join(lines))

    def keygen(self, *arguments, stdin=None):
        return subprocess.run([SSH_KEYGEN] + list(arguments), input=stdin, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.environment, timeout=120)

    def build(self, version, sign_with="ed25519", namespace=NAMESPACE, hash_algorithm=None):
        """An update archive and its .sig in the staging folder; returns the archive's path."""
        path = make_update(self.staging, version, mtime=time.time() - 60)
        if sign_with:
            options = ["-O", "hashalg=" + hash_algorithm] if hash_algorithm else []
            signed = self.keygen("-Y", "sign", "-f", self.keys[sign_with][0], "-n", namespace, *options, path)
            self.assertEqual(signed.returncode, 0, signed.stderr)
        return path

    def publish_built(self, path, signature=True, archive=True):
        """Move what build() made into the updates folder, each under a temporary name then renamed."""
        for source, wanted in ((path + ".sig", signature), (path, archive)):
            if wanted:
                target = os.path.join(self.updates, os.path.basename(source))
                shutil.copy2(source, target + ".part")
                os.rename(target + ".part", target)

    def start(self, **settings):
        return self.start_server(allowed_signers=self.allowed, **settings)

    def test_only_signed_archives_are_decompressed(self):
        """The signature is checked over the file as stored first: a forged or missing .sig costs no decompression."""
        self.publish_built(self.build(4))
        self.publish_built(self.build(5, "stranger"))
        self.publish_built(self.build(6), signature=False)
        decompressed = []
        real_check = sig.check_update_archive

        def recording_check(fileobj, digits, *args, **kwargs):
            decompressed.append(int(digits))
            return real_check(fileobj, digits, *args, **kwargs)

        with mock.patch.object(sig, "check_update_archive", recording_check):
            catalog = sig.Catalog(self.updates, signers=sig.load_allowed_signers(self.allowed).signers)
            catalog.start()
            self.addCleanup(catalog.stop)
            self.assertTrue(wait_until(lambda: catalog.snapshot.rejected == 1 and catalog.snapshot.updates, 20))
            self.assertTrue(wait_until(lambda: catalog.snapshot.waiting == 0, 20))
        self.assertEqual([update.version for update in catalog.snapshot.updates], [4])
        self.assertEqual(catalog.snapshot.unsigned, 1)
        self.assertEqual(decompressed, [4])

    def test_a_key_whose_valid_before_passes_withdraws_its_updates_without_a_sighup(self):
        boundary = time.time() + 4
        self.write_allowed('ops@example.org valid-before="%s" %s\n'
                           % (time.strftime("%Y%m%d%H%M%SZ", time.gmtime(boundary)), self.keys["ed25519"][1]))
        self.publish_built(self.build(1700000001))
        server = self.start()
        self.assertEqual(server.get("/version").body, b"1700000001")
        self.assertTrue(wait_until(lambda: server.get("/latest").status == 404, 12), server.log())
        self.assertGreaterEqual(time.time(), boundary - 1)
        self.assertEqual(server.get("/ls").body, b"")

    def test_allowed_signers_edits_take_effect_without_a_sighup_and_fail_closed(self):
        self.publish_built(self.build(1700000001))
        self.publish_built(self.build(1700000002, "rsa"))
        server = self.start()
        self.assertEqual(len(server.get("/ls").body.split(b"\n")), 2)
        self.write_allowed('rsa-ops@example.org namespaces="opq-box-update" %s\n' % self.keys["rsa"][1])
        self.assertTrue(wait_until(lambda: server.get("/ls").body == b"opq-box-update-1700000002.tar.bz2", 5),
                        "a key the file no longer lists is dropped: " + server.log())
        self.write_allowed("# every key revoked\n")
        self.assertTrue(wait_until(lambda: server.get("/latest").status == 404, 5), server.log())
        health = server.health()
        self.assertIs(health["ok"], False)
        self.assertIn("no signed update is offered", health["info"])
        self.write_allowed("ops@example.org %s\n" % self.keys["ed25519"][1])
        self.assertTrue(wait_until(lambda: server.get("/ls").body == b"opq-box-update-1700000001.tar.bz2", 5),
                        server.log())
        self.assertIs(server.health()["ok"], True)
        self.assertEqual(len([line for line in server.log().splitlines()
                              if " ERROR " in line and "no signed update is offered" in line]), 1, server.log())

    def test_a_broken_file_on_sighup_keeps_no_key(self):
        self.publish_built(self.build(1700000001))
        server = self.start()
        self.assertEqual(server.get("/version").body, b"1700000001")
        with open(self.allowed, "w") as allowed:
            allowed.write("")
        os.utime(self.allowed, (0, 0))    # SIGHUP alone must do it, whatever the watcher saw
        server.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: server.get("/latest").status == 404, 5), server.log())
        self.assertIs(server.health()["ok"], False)

    def test_signed_updates_are_offered_and_what_is_served_verifies_with_ssh_keygen(self):
        cases = [(1700000001, "ed25519", None), (1700000002, "ed25519", "sha256"), (1700000003, "rsa", None),
                 (1700000004, "rsa", "sha256")]
        for version, key, hash_algorithm in cases:
            self.publish_built(self.build(version, key, hash_algorithm=hash_algorithm))
        server = self.start()
        self.assertEqual(server.get("/ls").body.decode().split("\n"),
                         ["opq-box-update-%d.tar.bz2" % version for version, _, _ in cases])
        health = server.health()
        self.assertTrue(health["ok"])
        self.assertIn("signatures required", health["info"])
        signers = {entry["name"]: entry.get("signer") for entry in json.loads(server.get("/status").body)["files"]}
        self.assertEqual(signers["opq-box-update-1700000003.tar.bz2"], "rsa-ops@example.org")
        for version, key, _ in cases:
            name = "opq-box-update-%d.tar.bz2" % version
            with self.subTest(name=name):
                archive, signature = server.get("/update/" + name), server.get("/update/%s.sig" % name)
                self.assertEqual(signature.status, 200)
                self.assertEqual(signature.header("Content-Type"), "text/plain")
                self.assertEqual(signature.header("Cache-Control"), "public, max-age=31536000, immutable")
                self.assertEqual(server.get("/update/%s.sig" % name, {"If-None-Match": signature.header("ETag")}
                                            ).status, 304)
                served_signature = os.path.join(self.tmp, name + ".served.sig")
                with open(served_signature, "wb") as out:
                    out.write(signature.body)
                principal = "ops@example.org" if key == "ed25519" else "rsa-ops@example.org"
                checked = self.keygen("-Y", "verify", "-f", self.allowed, "-I", principal, "-n", NAMESPACE, "-s",
                                      served_signature, stdin=archive.body)
                self.assertEqual(checked.returncode, 0, checked.stderr)
        self.assertEqual(server.get("/update/opq-box-update-1700000009.tar.bz2.sig").status, 404)

    def test_nothing_wrongly_signed_is_ever_offered(self):
        good = self.build(1700000000)
        self.publish_built(good)
        refusals = {}

        def bad(version, reason, prepare):
            refusals["opq-box-update-%d.tar.bz2" % version] = reason
            prepare(os.path.join(self.updates, "opq-box-update-%d.tar.bz2" % version))

        def other_bytes(path):
            self.publish_built(self.build(int(path[-18:-8])))
            publish(path, archive_bytes(update_members(int(path[-18:-8]))))  # rebuilt: other bytes
        bad(1700000001, "bad signature", other_bytes)
        bad(1700000002, "no listed key made this signature",
            lambda path: self.publish_built(self.build(1700000002, "stranger")))
        bad(1700000003, "signed for namespace 'file', not 'opq-box-update'",
            lambda path: self.publish_built(self.build(1700000003, namespace="file")))
        bad(1700000004, "unsupported key type 'ecdsa-sha2-nistp256'",
            lambda path: self.publish_built(self.build(1700000004, "ecdsa")))

        def truncated_armor(path):
            self.publish_built(self.build(1700000005))
            with open(path + ".sig", "r+b") as signature:
                signature.truncate(100)
        bad(1700000005, "malformed armor", truncated_armor)

        def garbled_armor(path):
            self.publish_built(self.build(1700000006))
            with open(path + ".sig", "r+b") as signature:
                signature.seek(60)
                signature.write(b"!!!!")
        bad(1700000006, "malformed armor: bad base64", garbled_armor)

        def symlinked(path):
            built = self.build(1700000007)
            self.publish_built(built, signature=False)
            os.symlink(built + ".sig", path + ".sig")
        bad(1700000007, "the .sig is not a regular file", symlinked)

        def huge(path):
            self.publish_built(self.build(1700000008, sign_with=None), signature=False)
            with open(path + ".sig", "wb") as signature:
                signature.truncate(10 << 20)
        bad(1700000008, "the .sig is larger than 64 KiB", huge)

        self.write_allowed("ops@example.org %s\n" % self.keys["ed25519"][1],
                           "ecdsa-ops@example.org %s\n" % self.keys["ecdsa"][1])
        server = self.start()
        self.assertIn("line 3: unsupported key type 'ecdsa-sha2-nistp256'; signatures by this key are refused",
                      server.log())
        self.assertTrue(wait_until(lambda: server.health()["info"].count("rejected") == 1, 20), server.health())
        self.assertEqual(server.get("/ls").body.decode(), os.path.basename(good))
        self.assertEqual(server.get("/version").body, b"1700000000")
        self.assertIn("%d file(s) in the updates folder rejected" % len(refusals), server.health()["info"])
        for name, reason in refusals.items():
            with self.subTest(name=name):
                self.assertEqual(server.get("/update/" + name).status, 404)
                self.assertEqual(server.get("/update/%s.sig" % name).status, 404)
                self.assertEqual(server.log().count("rejected %s: signature: %s" % (name, reason)), 1, server.log())

    def test_a_listed_key_restricted_to_another_namespace_is_refused(self):
        self.write_allowed('ops@example.org namespaces="git,file" %s\n' % self.keys["ed25519"][1])
        self.publish_built(self.build(1700000000))
        server = self.start()
        self.assertEqual(server.get("/ls").body, b"")
        self.assertIn("the key is not allowed for namespace 'opq-box-update'", server.log())

    def test_publishing_order_does_not_matter(self):
        server = self.start(timing=QUICK_TIMING)
        first = self.build(1700000001)
        self.publish_built(first, signature=False)                  # the archive first: it waits
        self.assertTrue(wait_until(lambda: "1 update(s) waiting for a signature" in server.health().get("info", ""),
                                   10), server.health())
        self.assertEqual(server.get("/ls").body, b"")
        self.publish_built(first, archive=False)                    # then its signature: offered
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"1700000001", 10))
        second = self.build(1700000002)
        self.publish_built(second, archive=False)                   # the signature first
        time.sleep(2 * QUICK_TIMING["FolderWatcher.POLL_SECONDS"])  # seen alone by the watcher
        self.publish_built(second, signature=False)
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"1700000002", 10))

    def test_an_archive_replaced_after_its_signature_was_checked_is_withdrawn(self):
        path = self.build(1700000000)
        self.publish_built(path)
        server = self.start()
        self.assertEqual(server.get("/version").body, b"1700000000")
        publish(os.path.join(self.updates, os.path.basename(path)), archive_bytes(update_members(1700000000)))
        self.assertTrue(wait_until(lambda: server.get("/version").status == 404, 10))
        self.assertTrue(wait_until(lambda: "signature: bad signature" in server.log(), 10))
        self.assertEqual(server.get("/update/" + os.path.basename(path)).status, 404)

    def test_verification_off_still_requires_the_signature_but_not_the_structure(self):
        unstructured = os.path.join(self.staging, "opq-box-update-1700000001.tar.bz2")
        publish(unstructured, b"signed, but not an archive at all")
        self.keygen("-Y", "sign", "-f", self.keys["ed25519"][0], "-n", NAMESPACE, unstructured)
        self.publish_built(unstructured)
        self.publish_built(self.build(1700000002, sign_with=None), signature=False)
        server = self.start(verify_updates=False)
        self.assertEqual(server.get("/ls").body, b"opq-box-update-1700000001.tar.bz2")
        self.assertIn("1 update(s) waiting for a signature", server.health()["info"])

    def test_a_key_removed_from_the_file_stops_its_updates_at_restart_or_sighup_and_a_broken_file_fails_closed(self):
        self.publish_built(self.build(1700000001, "ed25519"))
        self.publish_built(self.build(1700000002, "rsa"))
        server = self.start()
        self.assertEqual(server.get("/version").body, b"1700000002")
        self.write_allowed("ops@example.org %s\n" % self.keys["ed25519"][1])     # the RSA key revoked
        server.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: server.get("/version").body == b"1700000001", 10), server.log())
        self.assertTrue(wait_until(lambda: "read 1 key(s)" in server.log(), 10), server.log())
        self.write_allowed("ops@example.org broken-key-type AAAA\n")             # a broken file keeps no key
        server.process.send_signal(signal.SIGHUP)
        self.assertTrue(wait_until(lambda: server.get("/version").status == 404, 10), server.log())
        self.assertIs(server.health()["ok"], False)
        self.write_allowed("rsa-ops@example.org %s\n" % self.keys["rsa"][1])
        self.assertEqual(server.stop(), 0)
        restarted = self.start()
        self.assertEqual(restarted.get("/ls").body, b"opq-box-update-1700000002.tar.bz2")

    def test_a_restart_with_many_signed_archives_offers_the_newest_first(self):
        versions = list(range(1700000000, 1700000030))
        for version in versions:
            self.publish_built(self.build(version))
        server = self.start(wait_for_checks=False)
        first = None
        deadline = time.monotonic() + 60
        while first is None and time.monotonic() < deadline:
            answer = server.get("/ls")
            if answer.body:
                first = answer.body.decode().split("\n")
            time.sleep(0.01)
        self.assertEqual(first[-1], "opq-box-update-%d.tar.bz2" % versions[-1], "the newest is offered first")
        self.assertTrue(wait_until(lambda: len(server.get("/ls").body.split(b"\n")) == len(versions), 60))

    def test_check_command_names_the_signer(self):
        good = self.build(1700000001)
        stranger = self.build(1700000002, "stranger")
        unsigned = self.build(1700000003, sign_with=None)
        finished = subprocess.run([python_executable(), SERVER, "check", "--allowed-signers", self.allowed, good,
                                   stranger, unsigned], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(finished.returncode, 1)
        lines = finished.stdout.decode().splitlines()
        self.assertRegex(lines[0], r"^OK        [0-9a-f]{64}  %s  signed by ops@example.org$" % good)
        self.assertEqual(lines[1], "REJECTED  %s: signature: no listed key made this signature" % stranger)
        self.assertEqual("WAITING   %s: waits for its signature %s.sig" % (unsigned, os.path.basename(unsigned)),
                         lines[2])

    def test_check_with_principals_as_the_boxes_verify(self):
        ed25519, rsa = self.build(1700000001), self.build(1700000002, "rsa")
        finished = subprocess.run([python_executable(), SERVER, "check", "--allowed-signers", self.allowed,
                                   "--principal", "ops@example.org", ed25519, rsa], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(finished.returncode, 1)
        lines = finished.stdout.decode().splitlines()
        self.assertRegex(lines[0], r"^OK        [0-9a-f]{64}  %s  signed by ops@example.org$" % ed25519)
        self.assertEqual(lines[1], "REJECTED  %s: signature: no listed key made this signature" % rsa)
        self.assertIn("line 3: listed for 'rsa-ops@example.org', which ssh-keygen -Y verify -I ops@example.org "
                      "never matches; ignored", finished.stderr.decode())
        both = subprocess.run([python_executable(), SERVER, "check", "--allowed-signers", self.allowed, "--principal",
                               "nobody@x", "--principal", "rsa-ops@example.org", rsa], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(both.returncode, 0, both.stdout)
        self.assertTrue(both.stdout.decode().endswith("  signed by rsa-ops@example.org\n"), both.stdout)
        alone = subprocess.run([python_executable(), SERVER, "check", "--principal", "ops@example.org", ed25519],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((alone.returncode, alone.stdout), (1, b""))
        self.assertEqual(alone.stderr, b"box_update_server: error: check: --principal needs --allowed-signers\n")

    def test_signer_principals_leave_keys_of_other_principals_unused(self):
        self.publish_built(self.build(1700000001, "ed25519"))
        self.publish_built(self.build(1700000002, "rsa"))
        server = self.start(signer_principals=["ops@example.org"])
        self.assertTrue(wait_until(lambda: server.health()["info"].count("rejected") == 1, 20), server.health())
        self.assertEqual(server.get("/ls").body, b"opq-box-update-1700000001.tar.bz2")
        self.assertIn("line 3: listed for 'rsa-ops@example.org', which ssh-keygen -Y verify -I ops@example.org never "
                      "matches; ignored", server.log())
        self.assertIn("rejected opq-box-update-1700000002.tar.bz2: signature: no listed key made this signature",
                      server.log())

    def test_the_signer_shown_is_the_principal_the_boxes_verify_with(self):
        self.write_allowed("ops@example.org,release@example.org %s\n" % self.keys["ed25519"][1])
        self.publish_built(self.build(1700000001, "ed25519"))
        server = self.start(signer_principals=["release@example.org"])
        files = {entry["name"]: entry for entry in json.loads(server.get("/status").body)["files"]}
        self.assertEqual(files["opq-box-update-1700000001.tar.bz2"]["signer"], "release@example.org")

    def test_lines_openssh_skips_are_skipped_and_named_at_start(self):
        self.write_allowed("ops@example.org cert-authority %s\n" % self.keys["rsa"][1],
                           'rsa-ops@example.org valid-after="20250132" %s\n' % self.keys["rsa"][1],
                           "ops@example.org %s\n" % self.keys["ed25519"][1])
        self.publish_built(self.build(1700000001, "ed25519"))
        server = self.start()
        self.assertEqual(server.get("/ls").body, b"opq-box-update-1700000001.tar.bz2")
        self.assertIn("line 2: cert-authority: certificates are not supported; skipped, as ssh-keygen skips it",
                      server.log())
        self.assertIn('line 3: bad options: invalid "valid-after" time', server.log())

    def test_armor_a_box_would_refuse_is_refused(self):
        variants = {1700000001: (b"\n", b"\r\n", "the BEGIN line ends in CR LF"),
                    1700000002: (b"-----BEGIN", b"\n-----BEGIN", "something (a blank line, spaces) before the BEGIN"),
                    1700000003: (b"SIGNATURE-----\n", b"SIGNATURE----- \n", "space or tab after the BEGIN line"),
                    1700000004: (b"\n-----END", b"\n  -----END", "the END line is indented")}
        for version, (old, new, _) in variants.items():
            built = self.build(version)
            with open(built + ".sig", "rb") as signature:
                armored = signature.read()
            with open(built + ".sig", "wb") as signature:
                signature.write(armored.replace(old, new, 1 if old != b"\n" else -1))
            self.publish_built(built)
        self.publish_built(self.build(1700000000))
        server = self.start()
        self.assertTrue(wait_until(lambda: "%d file(s)" % len(variants) in server.health()["info"], 20),
                        server.health())
        self.assertEqual(server.get("/ls").body, b"opq-box-update-1700000000.tar.bz2")
        for version, (_, _, reason) in variants.items():
            with self.subTest(reason):
                self.assertIn("rejected opq-box-update-%d.tar.bz2: signature: malformed armor: %s" % (version, reason),
                              server.log())


def readme_block(after):
    """The first bash block in README.md after the line that starts with `after`."""
    with open(os.path.join(ROOT, "README.md")) as readme:
        text = readme.read()
    start = text.index("\n" + after)
    return re.search(r"```bash\n(.*?)```", text[start:], re.S).group(1)


@unittest.skipIf(SSH_KEYGEN is None, "ssh-keygen is not installed: the README's signing workflow skipped")
class ReadmeSigningWorkflowTest(TempDirTestCase):
    """The README's commands for operators and boxes, run as written (paths pointed at the test's folders)."""

    def setUp(self):
        super().setUp()
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(os.path.join(self.home, ".ssh"))
        self.env = dict(os.environ, HOME=self.home)
        self.env.pop("SSH_AUTH_SOCK", None)
        self.operator = os.path.join(self.tmp, "operator")
        os.mkdir(self.operator)
        commands = readme_block("Make a key on the operator's machine")
        subprocess.run(["bash", "-c", commands.replace("ssh-keygen -t ed25519", "ssh-keygen -q -N '' -t ed25519")],
                       cwd=self.operator, env=self.env, check=True, timeout=60)
        self.allowed = os.path.join(self.operator, "allowed_signers")

    def publish_as_the_readme_says(self, version):
        make_update(self.operator, version, mtime=time.time() - 60)
        commands = readme_block("Sign and publish").replace("1764547200", str(version)).replace(
            "/srv/updates", self.updates).replace("python3 box_update_server.py", python_executable() + " " + SERVER)
        finished = subprocess.run(["bash", "-ec", commands], cwd=self.operator, env=self.env, timeout=60,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.assertEqual(finished.returncode, 0, finished.stdout.decode())
        self.assertIn(b"signed by ops@example.org", finished.stdout)

    def run_box(self, server):
        box = os.path.join(self.tmp, "box-%d" % time.monotonic_ns())
        os.makedirs(os.path.join(box, "bin"))
        with open(os.path.join(box, "bin", "sudo"), "w") as sudo:   # boxes run the installer with sudo
            sudo.write('#!/bin/sh\nexec "$@"\n')
        os.chmod(os.path.join(box, "bin", "sudo"), 0o755)
        env = dict(self.env, ENDPOINT=server.url("").rstrip("/"), ALLOWED_SIGNERS=self.allowed,
                   PRINCIPAL="ops@example.org", PATH=os.path.join(box, "bin") + os.pathsep + os.environ["PATH"])
        return subprocess.run(["sh", "-c", readme_block("On a box, this replaces")], cwd=box, env=env, timeout=120,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def test_a_signed_update_is_published_offered_and_installed_by_a_box(self):
        require_binary("wget")
        self.publish_as_the_readme_says(1764547200)
        server = self.start_server(allowed_signers=self.allowed)
        self.assertEqual(server.get("/version").body, b"1764547200")
        finished = self.run_box(server)
        self.assertEqual(finished.returncode, 0, finished.stdout.decode())
        self.assertIn(b"Good \"opq-box-update\" signature for ops@example.org", finished.stdout)
        self.assertIn(b"installed", finished.stdout)

    def test_a_box_refuses_what_a_listed_key_did_not_sign(self):
        require_binary("wget")
        self.publish_as_the_readme_says(1764547200)
        stranger = os.path.join(self.tmp, "stranger")
        subprocess.run([SSH_KEYGEN, "-q", "-N", "", "-t", "ed25519", "-f", stranger], check=True, env=self.env)
        forged = os.path.join(self.updates, "opq-box-update-1764547300.tar.bz2")
        make_update(self.updates, 1764547300)
        subprocess.run([SSH_KEYGEN, "-Y", "sign", "-f", stranger, "-n", NAMESPACE, forged], check=True,
                       env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        server = self.start_server()     # a compromised host: no allowed_signers, so the forgery is offered
        self.assertEqual(server.get("/version").body, b"1764547300")
        finished = self.run_box(server)
        self.assertNotEqual(finished.returncode, 0)
        self.assertNotIn(b"installed", finished.stdout)


class SignatureFileBoundTest(TempDirTestCase):
    """A .sig is bounded before it is read: a huge one costs no memory and is never served."""

    def test_a_huge_sig_is_refused_without_being_read_whole(self):
        path = os.path.join(self.tmp, "opq-box-update-1.tar.bz2.sig")
        with open(path, "wb") as signature:
            signature.truncate(64 << 20)                     # sparse: costs no disk
        tracemalloc.start()
        try:
            with self.assertRaises(sig.SignatureError) as caught:
                sig.read_signature_file(path, None)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertIn("larger than 64 KiB", str(caught.exception))
        self.assertLess(peak, 1 << 20, "read %d bytes of a 64 MB .sig" % peak)

    def test_without_keys_a_sig_over_64_kib_is_not_served(self):
        path = make_update(self.updates, 1700000000, mtime=time.time() - 60)
        with open(path + ".sig", "wb") as signature:
            signature.write(b"x" * (sig.MAX_SIGNATURE_BYTES + 1))
        server = self.start_server()
        self.assertEqual(server.get("/version").body, b"1700000000")      # the archive is offered
        self.assertTrue(wait_until(lambda: "not serving" in server.log(), 10), server.log())
        self.assertEqual(server.get("/update/%s.sig" % os.path.basename(path)).status, 404)


if __name__ == "__main__":
    unittest.main()
