meta:
  id: qemu_mapped_ram
  title: QEMU migration stream (QEVM v3) with mapped-ram RAM blocks
  application:
    - QEMU >= 9.0 (migrate file:PATH with the mapped-ram capability)
    - libvirt >= 11.2 (virsh save --image-format sparse)
  file-extension:
    - sav
    - bin
  xref:
    wikidata: Q624699
  license: CC0-1.0
  ks-version: 0.11
  endian: be
doc: |
  A QEMU migration stream saved to a file, as written by `migrate file:PATH` (QEMU 9.0
  and later). With the mapped-ram capability every RAM block has a 28-byte header, a
  bitmap of saved pages and a 1 MiB-aligned region where page N sits at
  `pages_offset + N * page_size`; the stream resumes after that region. The classic
  stream (no mapped-ram) carries its pages inline as PAGE/ZERO records.

  A libvirt save header may come first ("LibvirtQemudSave"); the QEMU stream then starts
  at 92 + data_len and the mapped-ram offsets stay absolute. A `file:PATH,offset=N`
  save without such a header is not detected here: open it with the stream's offset.

  The stream is read in order up to the RAM section's block list; QEMU then jumps over
  each block's pages (`ram_block.next`), and the stream goes on after the last block's
  pages (`qevm_stream.after_blocks`). Parsing stops at the first device section, whose
  length only the VM description at the end of the file can tell; the device state
  stays opaque.
doc-ref:
  - https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
  - https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
  - https://gitlab.com/qemu-project/qemu/-/blob/master/docs/devel/migration/mapped-ram.rst
seq:
  - id: libvirt_header
    type: libvirt_header
    if: has_libvirt_header
    doc: virQEMUSaveHeader of `virsh save`, in the writing host's byte order.
    doc-ref: https://gitlab.com/libvirt/libvirt/-/blob/master/src/qemu/qemu_saveimage.h
instances:
  magic_probe:
    pos: 0
    size: 16
    if: _io.size >= 16
    doc: The first 16 bytes, to tell a libvirt header from a bare QEMU stream.
  has_libvirt_header:
    value: >-
      _io.size >= 16 and (magic_probe == [0x4c, 0x69, 0x62, 0x76, 0x69, 0x72, 0x74, 0x51,
      0x65, 0x6d, 0x75, 0x64, 0x53, 0x61, 0x76, 0x65] or magic_probe == [0x4c, 0x69, 0x62,
      0x76, 0x69, 0x72, 0x74, 0x51, 0x65, 0x6d, 0x75, 0x64, 0x50, 0x61, 0x72, 0x74])
    doc: The file starts with "LibvirtQemudSave" (complete) or "LibvirtQemudPart" (not finished).
  libvirt_version_le:
    pos: 16
    type: u4le
    if: has_libvirt_header
    doc: The libvirt header version read little-endian; 2 on a little-endian host.
  stream_start:
    value: 'has_libvirt_header ? 92 + libvirt_header.data_len : 0'
    doc: File offset of the QEVM magic.
  stream:
    pos: stream_start
    type: qevm_stream
    doc: The QEMU migration stream.
types:
  libvirt_header:
    doc: The 92-byte header libvirt puts in front of the stream (host byte order).
    doc-ref: https://gitlab.com/libvirt/libvirt/-/blob/master/src/qemu/qemu_saveimage.h
    meta:
      endian:
        switch-on: _root.libvirt_version_le
        cases:
          2: le
          0x02000000: be
    seq:
      - id: magic
        size: 16
        doc: '"LibvirtQemudSave", or "LibvirtQemudPart" while the save runs.'
      - id: version
        type: u4
        doc: Header version, 2.
      - id: data_len
        type: u4
        doc: Bytes of domain XML, cookie and padding after this header.
      - id: was_running
        type: u4
        doc: 1 if the domain was running when saved.
      - id: format
        type: u4
        enum: libvirt_format
        doc: How the QEMU stream is stored; sparse means mapped-ram.
      - id: cookie_offset
        type: u4
        doc: Offset of the cookie XML inside the data area, 0 for none.
      - id: unused
        size: 56
        doc: Reserved, zero.
      - id: data
        size: data_len
        doc: Domain XML (NUL-terminated), optional cookie XML, zero padding.

  qevm_stream:
    doc: The migration stream proper (qemu_savevm_state_header and what follows).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: magic
        contents: QEVM
        doc: QEMU_VM_FILE_MAGIC.
      - id: version
        type: u4
        valid: 3
        doc: QEMU_VM_FILE_VERSION; version 2 is obsolete and refused by QEMU.
      - id: configuration
        type: configuration_section
        if: first_byte == 7
        doc: Present unless send-configuration is off (machine types <= 2.3, Xen).
      - id: elements
        type: element(mapped_ram, ignore_shared, -1)
        repeat: until
        repeat-until: _.is_ram_start or _.element_type == section_type::eof or _.is_device
        doc: Sections before RAM (if any) up to and with RAM START.
    instances:
      first_byte:
        pos: _io.pos
        type: u1
        doc: The byte after the version; 0x07 opens the configuration.
      mapped_ram:
        value: first_byte == 7 and configuration.body.mapped_ram
        doc: The stream announced the mapped-ram capability.
      ignore_shared:
        value: first_byte == 7 and configuration.body.ignore_shared
        doc: The stream announced x-ignore-shared.
      ram_start:
        value: elements.last
        doc: The RAM START section (if the stream has one).
      after_blocks:
        pos: ram_start.ram_start.first_block.list_end
        type: stream_rest(ram_start.full_header.section_id, mapped_ram, ignore_shared)
        if: ram_start.is_ram_start
        doc: The stream after the block list, where QEMU resumes past the last pages.

  configuration_section:
    doc: QEMU_VM_CONFIGURATION and the configuration that follows it.
    seq:
      - id: element_type
        contents: [0x07]
        doc: QEMU_VM_CONFIGURATION.
      - id: body
        type: configuration
        doc: Machine type and subsections.

  stream_rest:
    doc: The end of the RAM START payload, then the elements after it.
    params:
      - id: ram_section_id
        type: u4
        doc: The id of the "ram" section.
      - id: mapped_ram
        type: bool
        doc: Whether mapped-ram is on.
      - id: ignore_shared
        type: bool
        doc: Whether x-ignore-shared is on.
    seq:
      - id: ram_start_tail
        type: ram_records
        doc: The RAM START payload after the block list, up to EOS.
      - id: ram_start_footer
        type: section_footer
        if: footer_probe == 0x7e
        doc: The RAM START section's footer.
      - id: elements
        type: element(mapped_ram, ignore_shared, ram_section_id)
        repeat: until
        repeat-until: _.element_type == section_type::eof or _.is_device
        doc: PART and END sections of RAM, commands; up to the first device section or EOF.
    instances:
      footer_probe:
        pos: _io.pos
        type: u1
        doc: The byte after EOS; 0x7e when sections have footers.

  element:
    doc: One top-level element of the stream (a section, a command or EOF).
    params:
      - id: mapped_ram
        type: bool
        doc: Whether mapped-ram is on.
      - id: ignore_shared
        type: bool
        doc: Whether x-ignore-shared is on.
      - id: ram_section_id
        type: s8
        doc: The id of the "ram" section, -1 before its START.
    seq:
      - id: element_type
        type: u1
        enum: section_type
        doc: What follows (QEMU_VM_*).
      - id: full_header
        type: section_header_full
        if: element_type == section_type::section_start or element_type == section_type::section_full
        doc: Section id, idstr, instance id and version.
      - id: part_header
        type: section_header_part
        if: element_type == section_type::section_part or element_type == section_type::section_end
        doc: The id of a section begun earlier.
      - id: ram_start
        type: ram_start_payload(mapped_ram, ignore_shared)
        if: is_ram_start
        doc: The RAM section's setup payload up to the block list.
      - id: ram_payload
        type: ram_records
        if: is_ram_part
        doc: A later RAM section payload, up to EOS.
      - id: command
        type: command
        if: element_type == section_type::command
        doc: A migration command (QEMU_VM_COMMAND).
      - id: footer
        type: section_footer
        if: is_ram_part and footer_probe == 0x7e
        doc: The section footer, when send-section-footer is on (default).
    instances:
      is_ram_start:
        value: element_type == section_type::section_start and full_header.idstr == "ram"
        doc: The START section of "ram".
      is_ram_part:
        value: >-
          (element_type == section_type::section_part or element_type == section_type::section_end)
          and part_header.section_id == ram_section_id
        doc: A PART or END section of "ram".
      is_device:
        value: >-
          (element_type == section_type::section_full or element_type == section_type::section_start
          or element_type == section_type::section_part or element_type == section_type::section_end)
          and not is_ram_start and not is_ram_part
        doc: A device section, whose length only the VM description knows; parsing stops here.
      footer_probe:
        pos: _io.pos
        type: u1
        if: is_ram_part
        doc: The byte after the payload; 0x7e when sections have footers.

  configuration:
    doc: The configuration section (vmstate_configuration); it has no id and no footer.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: len_machine_type
        type: u4
        doc: Length of the machine type name.
      - id: machine_type
        type: str
        size: len_machine_type
        encoding: ASCII
        doc: The machine class name, e.g. "pc-q35-10.0"; the loader must match it.
      - id: subsections
        type: subsection
        repeat: until
        repeat-until: _.next_marker != 5
        if: first_marker == 5
        doc: target-page-bits, capabilities and uuid, each only when needed.
    instances:
      first_marker:
        pos: _io.pos
        type: u1
        doc: The byte after the machine name; 0x05 if a subsection follows.
      caps_index:
        value: >-
          first_marker != 5 ? -1 : (subsections[0].name == "configuration/capabilities" ? 0 :
          (subsections.size > 1 and subsections[1].name == "configuration/capabilities" ? 1 : -1))
        doc: Which subsection lists the capabilities (target-page-bits may come first).
      mapped_ram:
        value: caps_index >= 0 and subsections[caps_index].body.as<capabilities>.mapped_ram
        doc: The mapped-ram capability is on.
      ignore_shared:
        value: caps_index >= 0 and subsections[caps_index].body.as<capabilities>.ignore_shared
        doc: The x-ignore-shared capability is on.

  subsection:
    doc: A vmstate subsection (vmstate_subsection_save) of the configuration.
    seq:
      - id: marker
        contents: [0x05]
        doc: QEMU_VM_SUBSECTION.
      - id: len_name
        type: u1
        doc: Length of the subsection name.
      - id: name
        type: str
        size: len_name
        encoding: ASCII
        doc: e.g. "configuration/capabilities".
      - id: version_id
        type: u4
        doc: Subsection version, 1.
      - id: body
        type:
          switch-on: name
          cases:
            '"configuration/target-page-bits"': target_page_bits
            '"configuration/capabilities"': capabilities
            '"configuration/uuid"': vm_uuid
        doc: The subsection's fields.
    instances:
      next_marker:
        pos: _io.pos
        type: u1
        doc: The byte after this subsection; 0x05 if another follows.

  target_page_bits:
    doc: Sent when the target's page bits exceed its minimum.
    seq:
      - id: bits
        type: u4
        doc: TARGET_PAGE_BITS.

  capabilities:
    doc: The migration capabilities the loader must validate (mapped-ram, x-ignore-shared).
    seq:
      - id: num_capabilities
        type: u4
        doc: Number of names.
      - id: names
        type: capability
        repeat: expr
        repeat-expr: num_capabilities
        doc: The capability names.
    instances:
      mapped_ram:
        value: 'num_capabilities >= 1 and (names[0].name == "mapped-ram" or (num_capabilities >= 2 and names[1].name == "mapped-ram"))'
        doc: True when mapped-ram is on.
      ignore_shared:
        value: 'num_capabilities >= 1 and (names[0].name == "x-ignore-shared" or (num_capabilities >= 2 and names[1].name == "x-ignore-shared"))'
        doc: True when x-ignore-shared is on.

  capability:
    doc: One capability name (put_capability).
    seq:
      - id: len_name
        type: u1
        doc: Length of the name.
      - id: name
        type: str
        size: len_name
        encoding: ASCII
        doc: The QAPI name of the capability.

  vm_uuid:
    doc: The VM's UUID, when validate-uuid is on.
    seq:
      - id: uuid
        size: 16
        doc: The UUID bytes.

  section_header_full:
    doc: Header of a START or FULL section (save_section_header).
    seq:
      - id: section_id
        type: u4
        doc: SaveStateEntry.section_id; later PART/END sections and the footer repeat it.
      - id: len_idstr
        type: u1
        doc: Length of idstr.
      - id: idstr
        type: str
        size: len_idstr
        encoding: ASCII
        doc: The device name, "ram" for RAM.
      - id: instance_id
        type: u4
        doc: Instance of the device.
      - id: version_id
        type: u4
        doc: Version of its state; 4 for RAM.

  section_header_part:
    doc: Header of a PART or END section.
    seq:
      - id: section_id
        type: u4
        doc: The id given in the section's START.

  section_footer:
    doc: QEMU_VM_SECTION_FOOTER and the id of the section it closes.
    seq:
      - id: marker
        contents: [0x7e]
        doc: QEMU_VM_SECTION_FOOTER.
      - id: section_id
        type: u4
        doc: Must equal the section's id.

  command:
    doc: A command (qemu_savevm_command_send); QEMU 10.0 sends SWITCHOVER_START.
    seq:
      - id: cmd
        type: u2
        enum: vm_command
        doc: MIG_CMD_*.
      - id: len_data
        type: u2
        doc: Length of the data.
      - id: data
        size: len_data
        doc: The command's data.

  ram_start_payload:
    doc: RAM START (ram_save_setup) - MEM_SIZE word, the block list, then EOS.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    params:
      - id: mapped_ram
        type: bool
        doc: Whether each block carries a MappedRamHeader.
      - id: ignore_shared
        type: bool
        doc: Whether each block carries its address.
    seq:
      - id: mem_size_word
        type: u8
        doc: Total RAM bytes with RAM_SAVE_FLAG_MEM_SIZE (0x04) in the low bits.
      - id: first_block
        type: ram_block(mem_size, _io.pos, mapped_ram, ignore_shared)
        doc: The first block; the rest hang off its `next`.
    instances:
      mem_size:
        value: mem_size_word & ~0xfff
        doc: Sum of the blocks' used_length.
      mem_size_flags:
        value: mem_size_word & 0xfff
        enum: ram_flags
        doc: Must be MEM_SIZE.

  ram_block:
    doc: One RAMBlock in the block list, with its MappedRamHeader under mapped-ram.
    params:
      - id: remaining
        type: u8
        doc: MEM_SIZE minus the lengths of the blocks before this one.
      - id: entry_pos
        type: u8
        doc: File offset of this entry.
      - id: mapped_ram
        type: bool
        doc: Whether the entry carries a MappedRamHeader.
      - id: ignore_shared
        type: bool
        doc: Whether the entry carries the block's address.
    seq:
      - id: len_idstr
        type: u1
        doc: Length of the block name.
      - id: idstr
        type: str
        size: len_idstr
        encoding: ASCII
        doc: The RAMBlock name, e.g. "pc.ram".
      - id: used_length
        type: u8
        doc: Bytes of RAM in the block.
      - id: addr
        type: u8
        if: ignore_shared
        doc: The block's guest-physical address (x-ignore-shared only).
      - id: mapped_ram_header
        type: mapped_ram_header
        if: mapped_ram
        doc: Where the bitmap and the pages are.
    instances:
      entry_size:
        value: '1 + len_idstr + 8 + (ignore_shared ? 8 : 0) + (mapped_ram ? 28 : 0)'
        doc: Bytes of this entry in the stream.
      resume_pos:
        value: 'mapped_ram ? mapped_ram_header.pages_offset + used_length : entry_pos + entry_size'
        doc: Where QEMU reads on after this block.
      has_next:
        value: remaining > used_length
        doc: More blocks follow until MEM_SIZE is reached.
      next:
        pos: resume_pos
        type: ram_block(remaining - used_length, resume_pos, mapped_ram, ignore_shared)
        if: has_next
        doc: The next block.
      list_end:
        value: 'has_next ? next.list_end.as<u8> : resume_pos'
        doc: Where the stream resumes after the whole list.
      num_pages:
        value: 'mapped_ram ? used_length / mapped_ram_header.page_size : 0'
        doc: Pages in the block.
      bitmap_size:
        value: (num_pages + 63) / 64 * 8
        doc: BITS_TO_LONGS(num_pages) * sizeof(unsigned long) on a 64-bit host.
      bitmap:
        pos: mapped_ram_header.bitmap_offset
        size: bitmap_size
        if: mapped_ram
        doc: One bit a page, set when the page is in the file; host-order 64-bit words.
      pages:
        pos: mapped_ram_header.pages_offset
        size: used_length
        if: mapped_ram
        doc: Page N at N * page_size; slots of clear bits are zero or stale.

  mapped_ram_header:
    doc: MappedRamHeader, 28 bytes packed, big-endian.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    seq:
      - id: version
        type: u4
        doc: MAPPED_RAM_HDR_VERSION, 1.
      - id: page_size
        type: u8
        doc: The target page size (4096 on x86).
      - id: bitmap_offset
        type: u8
        doc: Absolute file offset of the block's bitmap.
      - id: pages_offset
        type: u8
        doc: Absolute file offset of page 0; 1 MiB-aligned by QEMU.

  ram_records:
    doc: RAM words until EOS; under mapped-ram only EOS, in a classic stream also pages.
    seq:
      - id: records
        type: ram_record
        repeat: until
        repeat-until: (_.word & 0x10) != 0
        doc: Records; the last one carries RAM_SAVE_FLAG_EOS.

  ram_record:
    doc: One be64 word (page address | RAM_SAVE_FLAG_*) and what follows it.
    seq:
      - id: word
        type: u8
        doc: Page-aligned offset in the block, flags in the low 12 bits.
      - id: len_idstr
        type: u1
        if: has_name
        doc: Length of the block name (absent with CONTINUE).
      - id: idstr
        type: str
        size: len_idstr
        encoding: ASCII
        if: has_name
        doc: The block the page belongs to.
      - id: page
        size: 4096
        if: (word & 0x08) != 0
        doc: The page (RAM_SAVE_FLAG_PAGE, x86 page size).
      - id: fill
        type: u1
        if: (word & 0x02) != 0
        doc: The fill byte of a zero page (RAM_SAVE_FLAG_ZERO), 0.
    instances:
      flags:
        value: word & 0xfff
        enum: ram_flags
        doc: RAM_SAVE_FLAG_* bits.
      addr:
        value: word & ~0xfff
        doc: Offset of the page in its block.
      has_name:
        value: '(word & 0x0a) != 0 and (word & 0x20) == 0'
        doc: PAGE or ZERO without CONTINUE names its block.

enums:
  section_type:
    0x00: eof
    0x01: section_start
    0x02: section_part
    0x03: section_end
    0x04: section_full
    0x05: subsection
    0x06: vmdescription
    0x07: configuration
    0x08: command
    0x7e: section_footer
  vm_command:
    0: invalid
    1: open_return_path
    2: ping
    3: postcopy_advise
    4: postcopy_listen
    5: postcopy_run
    6: postcopy_ram_discard
    7: packaged
    8: enable_colo
    9: postcopy_resume
    10: recv_bitmap
    11: switchover_start
  ram_flags:
    0x01: full
    0x02: zero
    0x04: mem_size
    0x08: page
    0x10: eos
    0x20: continued
    0x40: xbzrle
    0x80: hook
    0x100: compress_page
    0x200: multifd_flush
  libvirt_format:
    0: raw
    1: gzip
    2: bzip2
    3: xz
    4: lzop
    5: zstd
    6: sparse
