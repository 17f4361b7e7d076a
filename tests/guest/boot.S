/*
 * A 512-byte x86 boot sector for the QEMU tests. It switches to 32-bit protected mode,
 * stamps every 4 KiB page in [1 MiB, RAM_END) with a marker (u32 0x4d415250 at +4, the
 * page number at +8, its complement at +12), then loops forever adding 1 to the u32 at
 * +0 of every page: a guest that keeps dirtying all its memory, with counters that show
 * it runs. RAM_END is set when assembling (--defsym RAM_END=...).
 */
    .code16
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %ss
    movw $0x7c00, %sp
    inb $0x92, %al              /* fast A20 */
    orb $2, %al
    outb %al, $0x92
    lgdtl gdt_desc
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $protected

    .code32
protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl $0x7c00, %esp
    movl $0x100000, %edi
    movl $0x100, %ecx           /* page number of 1 MiB */
stamp:
    movl $0x4d415250, 4(%edi)
    movl %ecx, 8(%edi)
    movl %ecx, %eax
    notl %eax
    movl %eax, 12(%edi)
    addl $0x1000, %edi
    incl %ecx
    cmpl $RAM_END, %edi
    jb stamp
dirty:
    movl $0x100000, %edi
1:
    incl (%edi)
    addl $0x1000, %edi
    cmpl $RAM_END, %edi
    jb 1b
    jmp dirty

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9a000000ffff    /* code, flat 4 GiB */
    .quad 0x00cf92000000ffff    /* data, flat 4 GiB */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .org 510
    .word 0xaa55
