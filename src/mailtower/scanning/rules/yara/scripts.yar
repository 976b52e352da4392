/* Script droppers and downloaders (JScript, VBScript, HTA, WSF): code that reaches for the
   Windows Script Host or ActiveX to run programs or fetch and save files, and the classic
   decode-then-eval obfuscation. None of this belongs in ordinary mail. */

rule Mailtower_Script_Shell_Dropper
{
    meta:
        description = "Script creating WScript.Shell / Shell.Application and running a program"
        severity = "suspicious"
    strings:
        $create1 = "ActiveXObject" nocase
        $create2 = "CreateObject" nocase
        $create3 = "GetObject" nocase
        $shell1 = "WScript.Shell" nocase
        $shell2 = "Shell.Application" nocase
        $run1 = /\.\s*Run\s*\(/ nocase
        $run2 = /\.\s*Run\s+["a-z_]/ nocase
        $run3 = /\.\s*Exec\s*\(/ nocase
        $run4 = /\.\s*ShellExecute\s*[\( ]/ nocase
    condition:
        any of ($create*) and any of ($shell*) and any of ($run*)
}

rule Mailtower_Script_Downloader
{
    meta:
        description = "Script fetching over HTTP and writing the result to disk"
        severity = "suspicious"
    strings:
        $create1 = "ActiveXObject" nocase
        $create2 = "CreateObject" nocase
        $http1 = "XMLHTTP" nocase
        $http2 = "WinHttp.WinHttpRequest" nocase
        $save1 = "ADODB.Stream" nocase
        $save2 = "SaveToFile" nocase
        $save3 = "Scripting.FileSystemObject" nocase
    condition:
        any of ($create*) and any of ($http*) and 2 of ($save*)
}

rule Mailtower_Script_Eval_Decoded
{
    meta:
        description = "eval() of unescape()/fromCharCode()/atob() output: decode-then-run"
        severity = "suspicious"
    strings:
        $eval1 = /eval\s*\(\s*unescape\s*\(/ nocase
        $eval2 = /eval\s*\(\s*String\s*\.\s*fromCharCode\s*\(/ nocase
        $eval3 = /eval\s*\(\s*atob\s*\(/ nocase
        $eval4 = /Execute(Global)?\s*\(?\s*Chr[BW]?\s*\(/ nocase
    condition:
        any of them
}
