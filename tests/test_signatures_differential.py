"""Differential tests: the server's verdict on a signature equals ``ssh-keygen -Y verify``'s (OpenSSH 9.2, as on
the boxes) for a generated corpus: Ed25519 and RSA keys made by ssh-keygen, armor variants, allowed_signers
variants (options, dates, patterns, principals, lines OpenSSH skips) and tampered blobs.

Each case is judged three ways: by ``ssh-keygen -Y verify -I <principal>``, by the pure functions
(parse_allowed_signers, parse_sshsig, verify_sshsig) and by ``box_update_server.py check --principal`` in a
subprocess.  All three must agree, except where the server is deliberately stricter: those cases are named
(STRICTER) and must be refused by the server and accepted by ssh-keygen.

Times are the real clock (``check`` has no other), with dates far from now or placed relative to now; the
local time zone is one observing daylight saving time at this moment, so that a local valid-after is read as
OpenSSH reads it (standard time, tm_isdst 0).
"""

import base64
import collections
import os
import shutil
import subprocess
import tempfile
import time
import unittest

from support import SERVER, make_update, python_executable, require_binary

import box_update_server as sig

NAMESPACE = "opq-box-update"
L = 2 ** 252 + 27742317777372353535851937790883648493
VERSION = 1700000000
# POSIX TZ rules (no tzdata needed): one of the two observes daylight saving time at any moment of the year.
DST_ZONES = ("CET-1CEST,M3.5.0,M10.5.0/3", "AEST-10AEDT,M10.1.0,M4.1.0/3")
# Where the server refuses what ssh-keygen accepts, on purpose (see the top of section 3 of the server).
STRICTER = {
    "rsa1024": "RSA keys under 2048 bits are refused (OpenSSH reads 1024 bits and up)",
    "ecdsa": "ECDSA keys are refused: only Ed25519 and RSA are verified",
    "s-plus-l": "an Ed25519 S >= L is refused (RFC 8032 §5.1.7; OpenSSH's ref10 checks only S's top 3 bits)",
}

Case = collections.namedtuple("Case", "name allowed signature principal stricter")


def ssh_string(data):
    return len(data).to_bytes(4, "big") + data


def read_string(blob, offset):
    size = int.from_bytes(blob[offset:offset + 4], "big")
    return blob[offset + 4:offset + 4 + size], offset + 4 + size


def armor(blob):
    text = base64.b64encode(blob).decode("ascii")
    body = "\n".join(text[start:start + 70] for start in range(0, len(text), 70))
    return ("-----BEGIN SSH SIGNATURE-----\n%s\n-----END SSH SIGNATURE-----\n" % body).encode("ascii")


def dearmored(armored):
    return base64.b64decode(b"".join(armored.split(b"\n")[1:-2]))


def flip(blob, offset):
    changed = bytearray(blob)
    changed[offset] ^= 0x01
    return bytes(changed)


class SignatureDifferentialTest(unittest.TestCase):
    """Every case: the server's verdict (pure functions and ``check``) is ssh-keygen's, or named as stricter."""

    @classmethod
    def setUpClass(cls):
        cls.keygen = require_binary("ssh-keygen")
        cls.saved_tz = os.environ.get("TZ")
        cls.folder = tempfile.mkdtemp(prefix="sshsig-differential-")
        now = time.time()
        for zone in DST_ZONES:
            os.environ["TZ"] = zone
            time.tzset()
            if time.localtime(now).tm_isdst:
                break
        cls.environment = {name: value for name, value in os.environ.items() if name != "SSH_AUTH_SOCK"}
        cls.archive = make_update(cls.folder, VERSION, mtime=now - 60)
        cls.keys = {}
        for name, arguments in (("ops", ["-t", "ed25519"]), ("test", ["-t", "ed25519"]),
                                ("rsa", ["-t", "rsa", "-b", "2048"]), ("rsa1024", ["-t", "rsa", "-b", "1024"]),
                                ("ecdsa", ["-t", "ecdsa"])):
            path = os.path.join(cls.folder, name)
            cls.run_keygen(["-q", "-N", "", "-C", name, "-f", path] + arguments, check=True)
            with open(path + ".pub") as public:
                cls.keys[name] = (path, " ".join(public.read().split()[:2]))
        cls.corpus = cls.make_corpus(now)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.folder, True)
        if cls.saved_tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = cls.saved_tz
        time.tzset()

    @classmethod
    def run_keygen(cls, arguments, stdin=None, check=False):
        return subprocess.run([cls.keygen] + arguments, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=cls.environment, timeout=120, check=check)

    @classmethod
    def sign(cls, key, namespace=NAMESPACE, hash_algorithm="sha512"):
        with open(cls.archive, "rb") as archive:
            signed = cls.run_keygen(["-Y", "sign", "-n", namespace, "-f", cls.keys[key][0], "-O",
                                     "hashalg=" + hash_algorithm], archive.read(), check=True)
        return signed.stdout

    @classmethod
    def make_corpus(cls, now):
        ops, test, rsa = cls.keys["ops"][1], cls.keys["test"][1], cls.keys["rsa"][1]
        good = cls.sign("ops")
        blob = dearmored(good)
        begin, end = b"-----BEGIN SSH SIGNATURE-----", b"-----END SSH SIGNATURE-----"
        body = good[len(begin) + 1:good.index(b"\n" + end)]

        def local(moment):
            return time.strftime("%Y%m%d%H%M%S", time.localtime(moment))

        # The blob's fields, to tamper with each (PROTOCOL.sshsig §2).
        key_blob, offset = read_string(blob, 10)
        namespace_at = offset + 4
        _, offset = read_string(blob, offset)
        _, offset = read_string(blob, offset)
        hash_at = offset + 4
        _, offset = read_string(blob, offset)
        signature_blob, _ = read_string(blob, offset)
        raw = signature_blob[-64:]
        s_plus_l = raw[:32] + (int.from_bytes(raw[32:], "little") + L).to_bytes(32, "little")
        rewrapped = blob[:6] + (0).to_bytes(4, "big") + blob[10:]
        reserved = (blob[:10] + ssh_string(key_blob) + ssh_string(NAMESPACE.encode()) + ssh_string(b"tag")
                    + ssh_string(b"sha512") + ssh_string(signature_blob))

        signatures = {
            "good": good,
            "sha256": cls.sign("ops", hash_algorithm="sha256"),
            "rsa-sha512": cls.sign("rsa"),
            "rsa-sha256": cls.sign("rsa", hash_algorithm="sha256"),
            "other-namespace": cls.sign("ops", namespace="file"),
            "stranger": cls.sign("test"),
            "crlf": good.replace(b"\n", b"\r\n"),
            "crlf-after-begin": good[:len(begin) + 1] + good[len(begin) + 1:].replace(b"\n", b"\r\n"),
            "blank-line-before-begin": b"\n" + good,
            "space-before-begin": b" " + good,
            "space-after-begin": good.replace(begin + b"\n", begin + b" \n"),
            "tab-after-begin": good.replace(begin + b"\n", begin + b"\t\n"),
            "indented-end": good.replace(b"\n" + end, b"\n  " + end),
            "tab-indented-end": good.replace(b"\n" + end, b"\n\t" + end),
            "space-after-end": good.replace(end, end + b" "),
            "text-after-end": good + b"anything at all\n",
            "no-line-end-after-end": good.rstrip(b"\n"),
            "blank-lines-in-body": good.replace(b"\n", b"\n\n").replace(b"\n\n" + end, b"\n" + end),
            "white-space-in-body": begin + b"\n" + body.replace(b"\n", b" \t\x0b\x0c\r\n") + b"\n" + end + b"\n",
            "no-end": good.replace(end, b""),
            "truncated": good[:len(good) // 2],
            "nul-in-body": begin + b"\n" + body.replace(b"\n", b"\0\n", 1) + b"\n" + end + b"\n",
            "lower-case": good.lower(),
            "unpadded": good.replace(b"=\n" + end, b"\n" + end).replace(b"=\n" + end, b"\n" + end),
            "version-0": armor(rewrapped),
            "version-2": armor(blob[:6] + (2).to_bytes(4, "big") + blob[10:]),
            "reserved-field": armor(reserved),
            "trailing-byte": armor(blob + b"\0"),
            "truncated-blob": armor(blob[:-1]),
            "flipped-key": armor(flip(blob, 10 + 4 + len(key_blob) - 1)),
            "flipped-namespace": armor(flip(blob, namespace_at)),
            "flipped-hash-name": armor(flip(blob, hash_at + 4)),
            "flipped-signature": armor(flip(blob, len(blob) - 1)),
            "flipped-r": armor(flip(blob, len(blob) - 40)),
            "s-plus-l": armor(blob[:-64] + s_plus_l),
            "rsa1024": cls.sign("rsa1024"),
            "ecdsa": cls.sign("ecdsa"),
        }
        cases = []

        def case(name, allowed, signature="good", principal="ops@example.org"):
            cases.append(Case(name, allowed, signatures[signature], principal, STRICTER.get(signature)))

        standard = "ops@example.org %s\nrsa@example.org %s\n" % (ops, rsa)
        for signature in signatures:
            principal = "rsa@example.org" if signature.startswith("rsa-") else "ops@example.org"
            case("signature " + signature, standard + "rsa1024@example.org %s\nec@example.org %s\n"
                 % (cls.keys["rsa1024"][1], cls.keys["ecdsa"][1]), signature,
                 {"rsa1024": "rsa1024@example.org", "ecdsa": "ec@example.org"}.get(signature, principal))
        lines = {
            # principals
            "plain": "ops@example.org %s" % ops,
            "quoted": '"ops@example.org" %s' % ops,
            "quoted with space": '"ops team@example.org,ops@example.org" %s' % ops,
            "wildcard": "*@example.org %s" % ops,
            "question mark": "op?@example.org %s" % ops,
            "only negation": "!ops@example.org %s" % ops,
            "negated after": "*@example.org,!ops@example.org %s" % ops,
            "negation first": "!test@example.org,ops@example.org %s" % ops,
            "other principal": "test@example.org %s" % ops,
            "upper case": "OPS@example.org %s" % ops,
            "empty principal first": ",ops@example.org %s" % ops,
            "tabs and comment": "ops@example.org\t%s\tthe ops key" % ops,
            "leading space": "   ops@example.org %s" % ops,
            "cr before key": "ops@example.org\r%s\r" % ops,
            # options
            "namespaces": 'ops@example.org namespaces="opq-box-update" %s' % ops,
            "namespaces upper case": 'ops@example.org NAMESPACES="opq-box-update" %s' % ops,
            "namespaces pattern": 'ops@example.org namespaces="opq-*,file" %s' % ops,
            "namespaces negated": 'ops@example.org namespaces="*,!opq-box-update" %s' % ops,
            "namespaces other": 'ops@example.org namespaces="file,git" %s' % ops,
            "namespaces empty": 'ops@example.org namespaces="" %s' % ops,
            "namespaces not ascii": 'ops@example.org namespaces="\u00e9t\u00e9,opq-box-update" %s' % ops,
            "namespaces too long after": 'ops@example.org namespaces="opq-box-update,%s" %s' % ("x" * 1023, ops),
            "namespaces longest after": 'ops@example.org namespaces="opq-box-update,%s" %s' % ("x" * 1022, ops),
            "namespaces too long before": 'ops@example.org namespaces="%s,opq-box-update" %s' % ("x" * 1030, ops),
            "empty options": 'ops@example.org ,namespaces="opq-box-update",, %s' % ops,
            "trailing comma": 'ops@example.org namespaces="opq-box-update", %s' % ops,
            "unknown option": "ops@example.org no-touch-required %s" % ops,
            "cert-authority": "ops@example.org cert-authority %s" % ops,
            "cert-authority prefix": "ops@example.org cert-authorityx %s" % ops,
            "unclosed quote": 'ops@example.org namespaces="opq-box-update %s' % ops,
            "twice": 'ops@example.org namespaces="a",namespaces="opq-box-update" %s' % ops,
            # dates
            "valid-after epoch": 'ops@example.org valid-after="19700101Z" %s' % ops,
            "valid-after epoch+1": 'ops@example.org valid-after="19700101000001Z" %s' % ops,
            "valid-after before epoch": 'ops@example.org valid-after="19691231Z" %s' % ops,
            "valid-after 30 February": 'ops@example.org valid-after="20250230" %s' % ops,
            "valid-after 32 January": 'ops@example.org valid-after="20250132" %s' % ops,
            "valid-after month 13": 'ops@example.org valid-after="20251301Z" %s' % ops,
            "valid-after seven digits": 'ops@example.org valid-after="2025010" %s' % ops,
            "valid-after spaces": 'ops@example.org valid-after="2025 1 1Z" %s' % ops,
            "valid-after leap second": 'ops@example.org valid-after="20241231235961Z" %s' % ops,
            "valid-after second 62": 'ops@example.org valid-after="20241231235962Z" %s' % ops,
            "valid-after utc": 'ops@example.org valid-after="20240101utc" %s' % ops,
            "valid-after future": 'ops@example.org valid-after="20990101Z" %s' % ops,
            "valid-before past": 'ops@example.org valid-before="20200101" %s' % ops,
            "valid-before future": 'ops@example.org valid-before="20990101235959" %s' % ops,
            "window": 'ops@example.org valid-after="20200101",valid-before="20990101" %s' % ops,
            "window reversed": 'ops@example.org valid-after="20990101",valid-before="20200101" %s' % ops,
            "window empty": 'ops@example.org valid-after="20200101Z",valid-before="20200101Z" %s' % ops,
            "local two hours ago": 'ops@example.org valid-after="%s" %s' % (local(now - 7200), ops),
            "local in two hours": 'ops@example.org valid-after="%s" %s' % (local(now + 7200), ops),
            "local expired an hour ago": 'ops@example.org valid-before="%s" %s' % (local(now - 7200), ops),
            # daylight saving time: OpenSSH reads the wall clock as standard time, an hour later
            "local dst half an hour ago": 'ops@example.org valid-after="%s" %s' % (local(now - 1800), ops),
            "local dst expires in half an hour": 'ops@example.org valid-before="%s" %s' % (local(now + 1800), ops),
            # keys
            "rsa name for an ed25519 key": "ops@example.org ssh-rsa %s" % ops.split()[1],
            "truncated key": "ops@example.org %s" % ops[:-4],
            "no key": "ops@example.org",
            "key type only": "ops@example.org ssh-ed25519",
            "other key": "ops@example.org %s" % test,
        }
        for name, line in lines.items():
            case("line " + name, line + "\n")
        case("principal test@ on a wildcard line", lines["wildcard"] + "\n", principal="test@example.org")
        case("principal other than the line's", lines["plain"] + "\n", principal="test@example.org")
        files = {
            "comment ending in CR hides the next line": "# old key\rops@example.org %s\n" % ops,
            "comment ending in CR LF": "# old key\r\nops@example.org %s\r\n" % ops,
            "skipped lines then the key": "ops@example.org cert-authority %s\nops@example.org bad-option %s\n"
                                          'ops@example.org valid-after="20250132" %s\nops@example.org %s\n'
                                          % (ops, ops, ops, ops),
            "restricted then open": 'ops@example.org namespaces="file" %s\nops@example.org %s\n' % (ops, ops),
            "no final line end": "ops@example.org %s" % ops,
            "nul in a line": "ops@example.org %s\0 junk\n" % ops,
            "rsa signature-algorithm name": "rsa@example.org rsa-sha2-512 %s\n" % rsa.split()[1],
        }
        for name, text in files.items():
            case("file " + name, text)
        case("rsa under the rsa-sha2-512 name", files["rsa signature-algorithm name"], "rsa-sha512",
             "rsa@example.org")
        return cases

    def keygen_accepts(self, case):
        folder = tempfile.mkdtemp(dir=self.folder)
        allowed, signature = os.path.join(folder, "allowed_signers"), os.path.join(folder, "signature.sig")
        with open(allowed, "w", encoding="utf-8", newline="") as out:
            out.write(case.allowed)
        with open(signature, "wb") as out:
            out.write(case.signature)
        with open(self.archive, "rb") as archive:
            checked = self.run_keygen(["-Y", "verify", "-f", allowed, "-I", case.principal, "-n", NAMESPACE,
                                       "-s", signature], archive.read())
        return checked.returncode == 0

    def server_accepts(self, case):
        with open(self.archive, "rb") as archive:
            digests = sig.hash_update_file(archive)
        try:
            signature = sig.parse_sshsig(case.signature)
            sig.verify_sshsig(signature, digests.for_algorithm(signature.hash_algorithm),
                              sig.parse_allowed_signers(case.allowed).signers, NAMESPACE, principals=[case.principal])
            return True
        except sig.SignatureError:
            return False

    def check_accepts(self, cases):
        """``check --principal`` on a batch of cases sharing one allowed_signers file and principal."""
        folder = tempfile.mkdtemp(dir=self.folder)
        allowed = os.path.join(folder, "allowed_signers")
        with open(allowed, "w", encoding="utf-8", newline="") as out:
            out.write(cases[0].allowed)
        paths = []
        for number, case in enumerate(cases):
            os.mkdir(os.path.join(folder, str(number)))
            path = os.path.join(folder, str(number), os.path.basename(self.archive))
            os.link(self.archive, path)
            with open(path + ".sig", "wb") as out:
                out.write(case.signature)
            paths.append(path)
        finished = subprocess.run([python_executable(), SERVER, "check", "--allowed-signers", allowed, "--principal",
                                   cases[0].principal] + paths, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=self.environment, timeout=120)
        output = finished.stdout.decode()
        self.assertNotIn("Traceback", finished.stderr.decode())
        if "box_update_server: error:" in finished.stderr.decode():
            self.assertEqual((finished.returncode, output), (1, ""))
            return {case.name: False for case in cases}
        verdicts = {}
        for case, path, line in zip(cases, paths, output.splitlines()):
            self.assertIn(path, line)
            verdicts[case.name] = line.startswith("OK ")
            if verdicts[case.name]:
                self.assertTrue(line.endswith("  signed by " + case.principal), line)
        self.assertEqual(len(verdicts), len(cases), output)
        return verdicts

    def test_the_server_agrees_with_ssh_keygen(self):
        groups = collections.OrderedDict()
        for case in self.corpus:
            groups.setdefault((case.allowed, case.principal), []).append(case)
        checked = {}
        for batch in groups.values():
            checked.update(self.check_accepts(batch))
        accepted = stricter = 0
        for case in self.corpus:
            with self.subTest(case.name):
                keygen = self.keygen_accepts(case)
                ours = self.server_accepts(case)
                self.assertEqual(checked[case.name], ours, "check and the pure functions disagree")
                if case.stricter:
                    self.assertEqual((ours, keygen), (False, True), "STRICTER: " + case.stricter)
                    stricter += 1
                else:
                    self.assertEqual(ours, keygen, "ssh-keygen %s" % ("accepts" if keygen else "refuses"))
                accepted += ours
        self.assertGreater(accepted, 20)        # the corpus is not all refusals
        self.assertEqual(stricter, len(STRICTER))

    def test_the_corpus_covers_each_kind(self):
        names = " ".join(case.name for case in self.corpus)
        for kind in ("crlf", "blank-line-before-begin", "space-after-begin", "tab-after-begin", "indented-end",
                     "only negation", "namespaces too long", "valid-after epoch", "local dst", "30 February",
                     "comment ending in CR", "cert-authority", "unknown option", "flipped-signature", "rsa-sha256"):
            self.assertIn(kind, names)


if __name__ == "__main__":
    unittest.main()
