/* Anti-virus test files: a scanner that misses these is not scanning. */

rule Mailtower_EICAR_Test_File
{
    meta:
        description = "EICAR anti-virus test file (eicar.org)"
        severity = "virus"
    strings:
        // The 68-byte test file: its first 28 bytes, 24 bytes skipped, its last 16 bytes.
        $eicar = { 58 35 4F 21 50 25 40 41 50 5B 34 5C 50 5A 58 35 34 28 50 5E 29 37 43 43
                   29 37 7D 24 [24] 2D 54 45 53 54 2D 46 49 4C 45 21 24 48 2B 48 2A }
    condition:
        $eicar
}
