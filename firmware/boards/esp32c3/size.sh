#!/usr/bin/env bash
# Sizes of the release image (build it first: cargo build --release). Prints every section, then
# what the image needs of flash and of static RAM, and the room left in a 1,984 KiB OTA slot.
#
# llvm-size comes with `rustup component add llvm-tools`. The ESP32-C3 image has many sections:
#   flash      = everything stored in the image: code and constants run from flash (.text,
#                .rodata*, .flash.appdesc) and what the boot copies into RAM (.trap, .rwtext*,
#                .data*, .rtc_fast.text/.data); equal to the ELF's loadable file bytes
#   static RAM = code run from RAM (.trap, .rwtext*), .data*, .bss*, .noinit
#   not counted: the *_dummy sections (address-space placeholders, no bytes), .stack (the stack
#                gets whatever RAM is left) and .dram2_uninit (the Wi-Fi heap in the RAM the
#                bootloader used, free once the app runs)
set -euo pipefail
cd "$(dirname "$0")"
elf=target/riscv32imc-unknown-none-elf/release/sensor
size=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/bin/llvm-size 2>/dev/null | head -n 1)
if [ -z "$size" ]; then
    echo "size.sh: no llvm-size; run: rustup component add llvm-tools" >&2
    exit 1
fi
"$size" -A "$elf" | awk 'NR <= 2 || ($3 != 0 && $1 != "Total")'
"$size" -A "$elf" | awk '
    # 4 MB flash, nvs + otadata + phy_init + ota_0 + ota_1: each app slot is 0x1F0000 bytes.
    BEGIN { slot = 2031616 }
    $1 ~ /^\.(text|rodata.*|flash\..*|rtc_fast\.(text|data))$/ { flash += $2 }
    $1 ~ /^\.(trap|rwtext.*|data.*)$/                          { flash += $2; ram += $2 }
    $1 ~ /^\.(bss.*|noinit)$/                                  { ram += $2 }
    $1 == ".stack"                                             { stack = $2 }
    $1 == ".dram2_uninit"                                      { reclaimed = $2 }
    END {
        printf "flash %d bytes = %.1f KiB; OTA slot 0x1F0000 (1,984 KiB), %.1f KiB (%d%%) left\n",
            flash, flash / 1024, (slot - flash) / 1024, 100 * (slot - flash) / slot
        printf "static RAM %d bytes = %.1f KiB (stack: the remaining %.1f KiB; Wi-Fi heap in reclaimed RAM %.1f KiB)\n",
            ram, ram / 1024, stack / 1024, reclaimed / 1024
    }'
