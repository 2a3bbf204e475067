"""CodeShield tier 1: every regex rule of the `codeshield` usecase, on a positive and a negative example."""

from __future__ import annotations

import sys

import pytest

from gateway.guards.code_shield import (
    AGNOSTIC,
    CodeScanner,
    CodeShieldOptions,
    RuleSet,
    find_rules_dir,
)

if find_rules_dir() is None:  # pragma: no cover - the codeshield extra is not installed
    pytest.skip("codeshield package not installed", allow_module_level=True)

_FAKE = "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0"  # 40 alnum chars, no real secret

# (rule file, rule id) -> (language to scan as, positive snippet, negative snippet)
EXAMPLES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("c", "bugprone-scanf"): ("c", 'scanf("%s", buf);', 'scanf("%d", &n);'),
    ("c", "bugprone-strcat"): ("c", "strcat(dest, src);", "strncat(dest, src, sizeof(dest) - 1);"),
    ("c", "bugprone-gets"): ("c", "gets(buf);", "fgets(buf, sizeof buf, stdin);"),
    ("c", "insecure-strtok-usage"): ("c", "tok = strtok(str, delim);", "tok = strtok_r(str, delim, &save);"),
    ("c", "obsolete-getpw-usage"): ("c", "getpw(uid, buf);", "struct passwd *p = getpwuid(uid);"),
    ("cpp", "deprecated-auto_ptr-usage"): (
        "cpp",
        "std::auto_ptr<Foo> p(new Foo);",
        "std::unique_ptr<Foo> p;",
    ),
    ("cpp", "xml-external-entity-usage"): (
        "cpp",
        "doc = xmlReadDoc(buf, url, enc, XML_PARSE_NOENT);",
        "doc = xmlReadDoc(buf, url, enc, XML_PARSE_NONET);",
    ),
    ("csharp", "webform-encryption-mode-leakage"): (
        "csharp",
        '<system.web>\n  <pages viewStateEncryptionMode="Never" />\n</system.web>',
        '<system.web>\n  <pages viewStateEncryptionMode="Always" />\n</system.web>',
    ),
    ("csharp", "viewstate-mac-disabled"): (
        "csharp",
        '<system.web><pages enableViewStateMac="false" /></system.web>',
        '<system.web><pages enableViewStateMac="true" /></system.web>',
    ),
    ("java", "deprecated-ecb-usage"): (
        "java",
        'Cipher c = Cipher.getInstance("AES/ECB/PKCS5Padding");',
        'Cipher c = Cipher.getInstance("AES/GCM/NoPadding");',
    ),
    ("java", "deprecated-ecb-blockmode-usage"): (
        "java",
        "b.setBlockModes(KeyProperties.BLOCK_MODE_ECB);",
        "b.setBlockModes(KeyProperties.BLOCK_MODE_GCM);",
    ),
    ("java", "deprecated-aes-usage"): (
        "java",
        'Cipher c = Cipher.getInstance("AES");',
        'Cipher c = Cipher.getInstance("AES/GCM/NoPadding");',
    ),
    ("java", "deprecated-cbc-padding-usage"): (
        "java",
        'Cipher c = Cipher.getInstance("AES/CBC/PKCS5Padding");',
        'Cipher c = Cipher.getInstance("AES/GCM/NoPadding");',
    ),
    ("java", "deprecated-crypto-algorithms-usage"): (
        "java",
        'KeyGenerator k = KeyGenerator.getInstance("DES");',
        'KeyGenerator k = KeyGenerator.getInstance("AES");',
    ),
    ("java", "nullcipher-usage"): ("java", "Cipher c = new NullCipher();", "Cipher c = new AesCipher();"),
    ("java", "xml-external-entities-enabled"): (
        "java",
        'f.setProperty("javax.xml.stream.isSupportingExternalEntities", true);',
        'f.setProperty("javax.xml.stream.isSupportingExternalEntities", false);',
    ),
    ("java", "doctype-not-disabled"): (
        "java",
        'dbf.setFeature("http://apache.org/xml/features/disallow-doctype-decl", false);',
        'dbf.setFeature("http://apache.org/xml/features/disallow-doctype-decl", true);',
    ),
    ("java", "xml-external-entities-feature-enabled"): (
        "java",
        'dbf.setFeature("http://xml.org/sax/features/external-general-entities", true);',
        'dbf.setFeature("http://xml.org/sax/features/external-general-entities", false);',
    ),
    ("java", "rsa-without-oaep-padding"): (
        "java",
        'Cipher c = Cipher.getInstance("RSA/ECB/NoPadding");',
        'Cipher c = Cipher.getInstance("RSA/ECB/OAEPWithSHA-256AndMGF1Padding");',
    ),
    ("java", "weak-md2-hashing"): (
        "java",
        'MessageDigest d = MessageDigest.getInstance("MD2");',
        'MessageDigest d = MessageDigest.getInstance("SHA-256");',
    ),
    ("java", "weak-md4-hashing"): (
        "java",
        "String h = DigestUtils.md4Hex(data);",
        "String h = DigestUtils.sha256Hex(data);",
    ),
    ("java", "weak-md5-hashing"): (
        "java",
        'MessageDigest d = MessageDigest.getInstance("MD5");',
        'MessageDigest d = MessageDigest.getInstance("SHA-256");',
    ),
    ("java", "deprecated-rc2-rc4-usage"): (
        "java",
        'Cipher c = Cipher.getInstance("RC4");',
        'Cipher c = Cipher.getInstance("ChaCha20-Poly1305");',
    ),
    ("javascript", "unencrypted-fetch-usage"): (
        "javascript",
        "const r = await fetch('http://example.com/api');",
        "const r = await fetch('https://example.com/api');",
    ),
    ("php", "untrusted-data-deserialization"): (
        "php",
        "$o = unserialize($_GET['data']);",
        "$o = json_decode($_GET['data']);",
    ),
    ("php", "sensitive-info-exposure"): (
        "php",
        "ini_set('display_errors', 'on');",
        "ini_set('display_errors', 'off');",
    ),
    ("php", "risky-crypto-algorithm"): (
        "php",
        "$h = md5($password);",
        "$h = password_hash($password, PASSWORD_DEFAULT);",
    ),
    ("python", "insecure-md5-hash-usage"): ("python", "h = hashlib.md5(data)", "h = hashlib.sha256(data)"),
    ("python", "insecure-sha1-hash-usage"): ("python", "h = hashlib.sha1(data)", "h = hashlib.sha256(data)"),
    ("python", "insecure-hash-function-usage"): (
        "python",
        "h = hashlib.new('md5')",
        "h = hashlib.new('sha256')",
    ),
    (AGNOSTIC, "ALL-R-008"): ("shell", 'TOKEN="EAA' + "x" * 100 + '"', 'TOKEN="EAA' + "x" * 20 + '"'),
    (AGNOSTIC, "ALL-R-009"): (
        "text",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----\n",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG\n-----END PUBLIC KEY-----\n",
    ),
    (AGNOSTIC, "ALL-R-010"): (
        "shell",
        "export GH_TOKEN=ghp_" + _FAKE[:36],
        "export GH_TOKEN=ghp_" + _FAKE[:10],
    ),
    (AGNOSTIC, "ALL-R-011"): ("shell", "key = 'AIza" + _FAKE[:35] + "'", "key = 'AIza" + _FAKE[:10] + "'"),
    (AGNOSTIC, "ALL-R-012"): ("shell", "Authorization: Bearer ya29.A0ARrdaM-xyz_123", "ya29 is a road"),
    (AGNOSTIC, "ALL-R-013"): (
        "shell",
        "stripe.api_key = 'sk_live_" + _FAKE[:24] + "'",
        "key = 'sk_test_" + _FAKE[:24] + "'",
    ),
    (AGNOSTIC, "ALL-R-014"): ("shell", "TWILIO_KEY=SK" + "0123456789abcdef" * 2, "TWILIO_KEY=SK" + "g" * 32),
    (AGNOSTIC, "ALL-R-015"): ("shell", "HEROKU_API_KEY=" + "0123456789" * 4, "HEROKU_API_KEY=$SECRET"),
}


@pytest.fixture(scope="module")
def scanner() -> CodeScanner:
    rules = RuleSet.load(usecase="codeshield")
    return CodeScanner(rules, CodeShieldOptions.parse({"semgrep": "off"}), None)


def _ids(scanner: CodeScanner, code: str, language: str) -> set[tuple[str, str]]:
    found = scanner.regex_findings(code, scanner.scan_languages(language))
    return {(f.language, f.rule) for f in found}


def test_examples_cover_every_enabled_regex_rule(scanner: CodeScanner) -> None:
    enabled = {(src, r.id) for src, rules in scanner.rules.regex_by_file.items() for r in rules}
    assert enabled == set(EXAMPLES), "a codeshield regex rule was added or removed: update EXAMPLES"
    assert len(enabled) == 38  # C 5, C++ 2, C# 2, Java 14, JS 1, PHP 3, Python 3, secrets 8


@pytest.mark.parametrize("key", sorted(EXAMPLES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_rule_fires_on_positive_not_on_negative(scanner: CodeScanner, key: tuple[str, str]) -> None:
    language, positive, negative = EXAMPLES[key]
    assert key in _ids(scanner, positive, language), f"{key} missed {positive!r}"
    assert key not in _ids(scanner, negative, language), f"{key} fired on {negative!r}"


def test_rule_sets_follow_metas_composition(scanner: CodeScanner) -> None:
    def sources(lang: str) -> set[str]:
        return {r.source for r in scanner.rules.regex_for(lang)}

    assert sources("c") == {"c", AGNOSTIC}
    assert sources("cpp") == {"cpp", "c", AGNOSTIC}  # C++ also gets C's rules
    assert sources("python") == {"python", AGNOSTIC}
    assert sources("rust") == {AGNOSTIC}  # Rust's 13 rules are all off for codeshield
    assert sources(AGNOSTIC) == {AGNOSTIC}
    assert scanner.scan_languages("typescript") == ["javascript"]
    assert scanner.scan_languages("shell") == [AGNOSTIC]
    assert scanner.scan_languages(None) == [
        "c",
        "cpp",
        "csharp",
        "java",
        "javascript",
        "php",
        "python",
        "rust",
    ]


def test_severity_and_line_are_reported(scanner: CodeScanner) -> None:
    code = "#include <stdio.h>\nint main(void) {\n  char b[8];\n  gets(b);\n}\n"
    (f,) = [f for f in scanner.regex_findings(code, ["c"]) if f.rule == "bugprone-gets"]
    assert (f.severity, f.cwe, f.line, f.action, f.analyzer) == ("error", "CWE-242", 4, "block", "regex")
    (g,) = scanner.regex_findings("x = hashlib.md5(b)\n", ["python"])
    assert (g.severity, g.action) == ("warning", "warn")


def test_comment_lines_are_ignored_like_meta_but_a_later_real_use_is_not(scanner: CodeScanner) -> None:
    assert _ids(scanner, "// gets(buf);\n", "c") == set()
    assert _ids(scanner, "# h = hashlib.md5(x)\n", "python") == set()
    assert _ids(scanner, "/* gets(buf); */\n", "c") == set()
    # Meta's driver looks at the first match only and drops it when commented: we keep searching.
    code = "# old: hashlib.md5(x)\nh = hashlib.md5(x)\n"
    (f,) = scanner.regex_findings(code, ["python"])
    assert f.line == 2


def test_rules_are_read_without_importing_codeshield_driver() -> None:
    RuleSet.load(usecase="codeshield")
    # importing codeshield's driver runs oss.py, which needs semgrep and writes a symlink into site-packages
    assert "codeshield.insecure_code_detector.oss" not in sys.modules
    assert "codeshield.cs" not in sys.modules


def test_cyberseceval_usecase_enables_more_rules() -> None:
    cs = RuleSet.load(usecase="cyberseceval")
    ids = {r.id for r in cs.regex_for("c")}
    assert "insecure-tmpnam-usage" in ids and "bugprone-strcpy" in ids
    plain = RuleSet.load(usecase="codeshield")
    assert "insecure-tmpnam-usage" not in {r.id for r in plain.regex_for("c")}


def test_semgrep_rules_loaded_with_prescans() -> None:
    rules = RuleSet.load(usecase="codeshield")
    counts = {lang: len(v) for lang, v in rules.semgrep_by_lang.items()}
    assert counts == {"c": 16, "cpp": 16, "csharp": 20, "java": 11, "javascript": 13, "php": 7, "python": 10}
    assert rules.semgrep_by_lang["c"][0] is rules.semgrep_by_lang["cpp"][0]  # identical rules shared
    assert len(rules.all_semgrep_rules) == 77
    missing = {r.id for r in rules.all_semgrep_rules if r.prescan is None}
    assert missing == {"vulnerable-sprintf", "vulnerable-strcpy"}
    ecb = next(r for r in rules.semgrep_by_lang["java"] if r.severity == "error")
    assert ecb.severity == "error"  # semgrep's "ERROR" normalised (Meta's driver compares it to "error")
