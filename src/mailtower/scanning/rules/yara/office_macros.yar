/* Office documents whose VBA runs on open and reaches for the operating system.

   VBA source is stored compressed (MS-OVBA), but the compression keeps the first occurrence
   of each word as literal bytes, so procedure names and the objects they call stay visible in
   OLE files (.doc/.xls and the vbaProject.bin inside .docm/.xlsm) and in exported modules.
   Macros alone are ordinary; auto-exec plus process or download behaviour in mail is not.
   The compressed form shows a word only when it falls inside one group of eight tokens, so the
   scanning pipeline also hands this rule each document's VBA source as read by olevba (an
   object of type text/x-vba, part "<document>!vba"), where "Attribute VB_" always stands. */

rule Mailtower_Office_AutoExec_Shell_Macro
{
    meta:
        description = "VBA project with an auto-exec entry point and shell / object creation"
        severity = "suspicious"
    strings:
        $ole = { D0 CF 11 E0 A1 B1 1A E1 }
        $vba1 = "Attribute VB_" nocase
        $vba2 = "_VBA_PROJECT" wide

        $auto1 = "AutoOpen" nocase
        $auto2 = "Auto_Open" nocase
        $auto3 = "Document_Open" nocase
        $auto4 = "Workbook_Open" nocase
        $auto5 = "AutoExec" nocase
        $auto6 = "AutoClose" nocase
        $auto7 = "Auto_Close" nocase
        $auto8 = "Document_Close" nocase
        $auto9 = "Workbook_Activate" nocase
        $auto10 = "Document_New" nocase
        $auto11 = "AutoNew" nocase

        // Not CreateObject or GetObject as such: business macros open dictionaries and
        // databases with them every day (Skeptic's vba-behaviour list tells the ProgIDs apart).
        $exec1 = "Shell" nocase
        $exec2 = "XMLHTTP" nocase
        $exec3 = "WinHttp" nocase
        $exec4 = "WScript" nocase
        $exec5 = "ShellExecute" nocase
        $exec6 = "URLDownloadToFile" nocase
        $exec7 = "Lib \"kernel32" nocase
        $exec8 = "CallByName" nocase
        $exec9 = "MacScript" nocase
        $exec10 = "ADODB.Stream" nocase
        $exec11 = "powershell" nocase
        $exec12 = "cmd.exe" nocase
        $exec13 = "mshta" nocase
        $exec14 = "Win32_Process" nocase
    condition:
        ($ole at 0 or $vba1) and any of ($vba*) and any of ($auto*) and any of ($exec*)
}
