/* Executable formats. Informational: the Skeptic heuristics decide what an executable in a
   given place means (a PE under a .txt name or an audio/x-wav type is another matter than a
   declared .exe), so these rules never decide a verdict alone. */

rule Mailtower_PE_Executable
{
    meta:
        description = "Windows PE executable: MZ header whose e_lfanew points at PE\\0\\0"
        severity = "info"
    condition:
        filesize > 64 and
        uint16(0) == 0x5A4D and
        uint32(0x3C) >= 0x40 and uint32(0x3C) <= filesize - 4 and
        uint32(uint32(0x3C)) == 0x00004550
}

rule Mailtower_ELF_Executable
{
    meta:
        description = "ELF executable or shared object"
        severity = "info"
    condition:
        uint32(0) == 0x464C457F and (uint16(16) == 2 or uint16(16) == 3)
}
