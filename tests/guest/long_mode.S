/*
 * A 512-byte x86 boot sector that goes straight from real mode to 64-bit long mode
 * (identity-mapped first 4 MiB in 2 MiB pages), loads every general register with a
 * distinct value, writes 0x474e4f4c ("LONG") at 0x500 and then loops, incrementing the
 * u64 at 0x508. For the tests that compare our CPU notes with QEMU's for a long-mode vCPU.
 */
    .code16
    .globl _start
_start:
    cli
    xorw %ax, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw $0x7c00, %sp
    inb $0x92, %al              /* fast A20 */
    orb $2, %al
    outb %al, $0x92
    movw $0x1000, %di           /* clear 0x1000-0x3fff: PML4, PDPT, PD */
    movw $0xc00, %cx
    xorl %eax, %eax
    rep stosl
    movl $0x2003, 0x1000        /* PML4[0] -> PDPT, present + writable */
    movl $0x3003, 0x2000        /* PDPT[0] -> PD */
    movl $0x000083, 0x3000      /* PD[0]: 2 MiB page at 0 */
    movl $0x200083, 0x3008      /* PD[1]: 2 MiB page at 2 MiB */
    movl %cr4, %eax
    orl $0x20, %eax             /* PAE */
    movl %eax, %cr4
    movl $0x1000, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx      /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax       /* PG + PE: long mode active */
    movl %eax, %cr0
    lgdtl gdt_desc
    ljmpl $0x08, $long_mode

    .code64
long_mode:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq $0x7000, %rsp
    movabsq $0x1111111111111111, %rax
    movabsq $0x2222222222222222, %rbx
    movabsq $0x3333333333333333, %rcx
    movabsq $0x4444444444444444, %rdx
    movabsq $0x5555555555555555, %rsi
    movabsq $0x6666666666666666, %rdi
    movabsq $0x7777777777777777, %rbp
    movabsq $0x8888888888888888, %r8
    movabsq $0x9999999999999999, %r9
    movabsq $0xaaaaaaaaaaaaaaaa, %r10
    movabsq $0xbbbbbbbbbbbbbbbb, %r11
    movabsq $0xcccccccccccccccc, %r12
    movabsq $0xdddddddddddddddd, %r13
    movabsq $0xeeeeeeeeeeeeeeee, %r14
    movabsq $0xffffffffffffffff, %r15
    movl $0x474e4f4c, 0x500
1:
    incq 0x508
    jmp 1b

    .p2align 3
gdt:
    .quad 0
    .quad 0x00209a0000000000    /* code, 64-bit */
    .quad 0x0000920000000000    /* data */
gdt_desc:
    .word gdt_desc - gdt - 1
    .long gdt

    .org 510
    .word 0xaa55
