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

  Where the stream starts (`stream_start`): behind a libvirt save header
  ("LibvirtQemudSave", at 92 + data_len), else at 0 when the file starts with the QEVM
  v3 magic, else at the first QEVM v3 magic in the first MiB (a `file:PATH,offset=N`
  save behind a management tool's own prefix). The mapped-ram offsets are absolute
  file offsets in every case.

  The stream is read in order up to the RAM section's block list. QEMU jumps over each
  block's pages to the next entry, so the blocks (`ram_start.blocks`) are a flat list
  whose entries are read at the position the previous entry ends at (`resume_pos`); the
  stream goes on after the last block's pages (`qevm_stream.after_blocks`). Parsing
  stops at the first device section, whose length only the VM description at the end
  of the file can tell; the device state stays opaque.
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
  head:
    pos: 0
    size: 8
    if: _io.size >= 8
    doc: The first 8 bytes, to tell a QEVM stream at 0 from one further on.
  starts_with_qevm:
    value: '_io.size >= 8 and head == [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3]'
    doc: The file starts with the QEVM magic and version 3.
  qevm_search:
    pos: 0
    size: '_io.size < 0x100000 ? _io.size : 0x100000'
    type: qevm_search
    if: not has_libvirt_header and not starts_with_qevm
    doc: The first MiB, searched for the QEVM v3 magic (a `file:PATH,offset=N` save).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/docs/devel/migration/main.rst
  stream_start:
    value: >-
      has_libvirt_header ? 92 + libvirt_header.data_len :
      (starts_with_qevm ? 0 : (qevm_search.found ? qevm_search.offset : 0))
    doc: File offset of the QEVM magic.
  stream:
    pos: stream_start
    type: qevm_stream
    doc: The QEMU migration stream.
types:
  libvirt_header:
    doc: The 92-byte header libvirt puts in front of the stream (host byte order).
    doc-ref: https://gitlab.com/libvirt/libvirt/-/blob/master/src/qemu/qemu_saveimage.h
    -orig-id: virQEMUSaveHeader
    meta:
      endian:
        switch-on: _root.libvirt_version_le
        cases:
          2: le
          0x02000000: be
    seq:
      - id: magic
        size: 16
        -orig-id: magic
        doc: '"LibvirtQemudSave" (QEMU_SAVE_MAGIC), or "LibvirtQemudPart" (QEMU_SAVE_PARTIAL) while the save runs.'
      - id: version
        type: u4
        -orig-id: version
        doc: Header version, 2 (QEMU_SAVE_VERSION).
      - id: data_len
        type: u4
        -orig-id: data_len
        doc: Bytes of domain XML, cookie and padding after this header.
      - id: was_running
        type: u4
        -orig-id: was_running
        doc: 1 if the domain was running when saved.
      - id: format
        type: u4
        enum: libvirt_format
        -orig-id: format
        doc: How the QEMU stream is stored (virQEMUSaveFormat); sparse means mapped-ram.
      - id: cookie_offset
        type: u4
        -orig-id: cookieOffset
        doc: Offset of the cookie XML inside the data area, 0 for none.
      - id: unused
        size: 56
        -orig-id: unused
        doc: Reserved, zero (14 words).
      - id: data
        size: data_len
        doc: Domain XML (NUL-terminated), optional cookie XML, zero padding.

  qevm_search:
    doc: |
      The QEVM v3 magic searched byte by byte: each candidate is the run of bytes up to
      the next "Q"; the search ends at the first "Q" followed by "EVM" and version 3, or
      at the end of the first MiB. mappedram's reader does the same.
    seq:
      - id: candidates
        type: qevm_candidate(_io.pos)
        repeat: until
        repeat-until: _.is_magic or _io.eof
        doc: The runs before each "Q"; the last one ends before the magic if it is found.
    instances:
      found:
        value: candidates.last.is_magic
        doc: The first MiB holds the QEVM v3 magic.
      offset:
        value: candidates.last.q_pos
        doc: File offset of the magic.

  qevm_candidate:
    doc: |
      The bytes before the next "Q" (0x51), and whether "QEVM" and version 3 start there.
      The "Q" is consumed but not kept: kaitai-struct 0.11's JavaScript runtime steps one
      byte too far on a terminator that is both included and consumed.
    params:
      - id: start
        type: u8
        doc: File offset of the run.
    seq:
      - id: run
        terminator: 0x51
        eos-error: false
        doc: The bytes before the "Q" (all the rest when there is no "Q").
    instances:
      q_pos:
        value: start + run.size
        doc: File offset of the "Q" (the end of the searched bytes when there is none).
      rest:
        pos: q_pos + 1
        size: 7
        if: q_pos + 8 <= _io.size
        doc: The 7 bytes after the "Q".
      is_magic:
        value: 'q_pos + 8 <= _io.size and rest == [0x45, 0x56, 0x4d, 0, 0, 0, 3]'
        doc: '"QEVM" and version 3 start at `q_pos`.'

  qevm_stream:
    doc: The migration stream proper (qemu_savevm_state_header and what follows).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: magic
        contents: QEVM
        -orig-id: QEMU_VM_FILE_MAGIC
        doc: 0x5145564d.
      - id: version
        type: u4
        valid: 3
        -orig-id: QEMU_VM_FILE_VERSION
        doc: Version 3; version 2 (QEMU_VM_FILE_VERSION_COMPAT) is obsolete and refused by QEMU.
      - id: configuration
        type: configuration_section
        if: first_byte == 7
        doc: Present unless send-configuration is off (machine types <= 2.3, Xen).
      - id: elements
        type: element(mapped_ram, ignore_shared, -1, page_size)
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
      page_size:
        value: >-
          first_byte == 7 and configuration.body.target_page_bits_index >= 0
          ? 1 << configuration.body.target_page_bits :
          (first_byte == 7 and (configuration.body.machine_type == "sun4u"
          or configuration.body.machine_type == "sun4v" or configuration.body.machine_type == "niagara"
          or configuration.body.machine_type == "clipper") ? 8192 : 4096)
        doc: |
          TARGET_PAGE_SIZE, the length of a classic stream's PAGE record. QEMU sends
          target-page-bits only on targets whose page size varies (arm), so the stream
          rarely says it: otherwise it is 8 KiB for sparc64 (sun4u, sun4v, niagara) and
          alpha (clipper), and 4 KiB on the others. The VM description JSON at the end of
          the file has it as "page_size"; under mapped-ram each MappedRamHeader has it.
      ram_start:
        value: elements.last
        doc: The RAM START section (if the stream has one).
      after_blocks:
        pos: ram_start.ram_start.list_end
        type: stream_rest(ram_start.full_header.section_id, mapped_ram, ignore_shared, page_size)
        if: ram_start.is_ram_start
        doc: The stream after the block list, where QEMU resumes past the last pages.

  configuration_section:
    doc: QEMU_VM_CONFIGURATION and the configuration that follows it.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: element_type
        contents: [0x07]
        -orig-id: QEMU_VM_CONFIGURATION
        doc: The configuration's marker byte.
      - id: body
        type: configuration
        doc: Machine type and subsections.

  stream_rest:
    doc: The end of the RAM START payload, then the elements after it.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
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
      - id: page_size
        type: u4
        doc: Bytes of a PAGE record's page.
    seq:
      - id: ram_start_tail
        type: ram_records(page_size)
        doc: The RAM START payload after the block list, up to EOS.
      - id: ram_start_footer
        type: section_footer
        if: footer_probe == 0x7e
        doc: The RAM START section's footer.
      - id: elements
        type: element(mapped_ram, ignore_shared, ram_section_id, page_size)
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
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
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
      - id: page_size
        type: u4
        doc: Bytes of a PAGE record's page.
    seq:
      - id: element_type
        type: u1
        enum: section_type
        -orig-id: section_type
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
        type: ram_records(page_size)
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
    doc: The configuration section (vmstate_configuration, fields of SaveState); no id, no footer.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: len_machine_type
        type: u4
        -orig-id: len
        doc: Length of the machine type name.
      - id: machine_type
        type: str
        size: len_machine_type
        encoding: ASCII
        -orig-id: name
        doc: The machine class name, e.g. "pc-q35-10.0"; the loader must match it.
      - id: subsections
        type: subsection(_index)
        repeat: until
        repeat-until: _.next_marker != 5
        if: first_marker == 5
        doc: target-page-bits, capabilities and uuid, each only when needed, in any order.
    instances:
      first_marker:
        pos: _io.pos
        type: u1
        doc: The byte after the machine name; 0x05 if a subsection follows.
      caps_index:
        value: 'first_marker == 5 ? subsections.last.caps_index : -1'
        doc: Which subsection lists the capabilities, -1 for none.
      target_page_bits_index:
        value: 'first_marker == 5 ? subsections.last.target_page_bits_index : -1'
        doc: Which subsection gives the target page bits, -1 for none.
      target_page_bits:
        value: 'target_page_bits_index >= 0 ? subsections[target_page_bits_index].body.as<target_page_bits>.bits : 0'
        doc: TARGET_PAGE_BITS when the stream gives it, else 0.
      mapped_ram:
        value: caps_index >= 0 and subsections[caps_index].body.as<capabilities>.mapped_ram
        doc: The mapped-ram capability is on.
      ignore_shared:
        value: caps_index >= 0 and subsections[caps_index].body.as<capabilities>.ignore_shared
        doc: The x-ignore-shared capability is on.

  subsection:
    doc: A vmstate subsection (vmstate_subsection_save) of the configuration.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/vmstate.c
    params:
      - id: index
        type: s4
        doc: Place in the configuration's list.
    seq:
      - id: marker
        contents: [0x05]
        -orig-id: QEMU_VM_SUBSECTION
        doc: Opens a subsection.
      - id: len_name
        type: u1
        doc: Length of the subsection name.
      - id: name
        type: str
        size: len_name
        encoding: ASCII
        -orig-id: vmsd->name
        doc: e.g. "configuration/capabilities".
      - id: version_id
        type: u4
        -orig-id: version_id
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
      caps_index:
        value: >-
          name == "configuration/capabilities" ? index :
          (index > 0 ? _parent.subsections[index - 1].caps_index.as<s4> : -1)
        doc: The last capabilities subsection up to this one, -1 for none.
      target_page_bits_index:
        value: >-
          name == "configuration/target-page-bits" ? index :
          (index > 0 ? _parent.subsections[index - 1].target_page_bits_index.as<s4> : -1)
        doc: The last target-page-bits subsection up to this one, -1 for none.

  target_page_bits:
    doc: Sent when the target's page bits exceed its minimum (targets whose page size varies).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: bits
        type: u4
        -orig-id: target_page_bits
        doc: TARGET_PAGE_BITS.

  capabilities:
    doc: The migration capabilities the loader must validate (mapped-ram, x-ignore-shared).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: num_capabilities
        type: u4
        -orig-id: caps_count
        doc: Number of names.
      - id: names
        type: capability(_index)
        repeat: expr
        repeat-expr: num_capabilities
        -orig-id: capabilities
        doc: The capability names, in any order.
    instances:
      mapped_ram:
        value: num_capabilities > 0 and names.last.mapped_ram_so_far
        doc: True when mapped-ram is on.
      ignore_shared:
        value: num_capabilities > 0 and names.last.ignore_shared_so_far
        doc: True when x-ignore-shared is on.

  capability:
    doc: One capability name (put_capability).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    params:
      - id: index
        type: s4
        doc: Place in the list.
    seq:
      - id: len_name
        type: u1
        doc: Length of the name.
      - id: name
        type: str
        size: len_name
        encoding: ASCII
        doc: The QAPI name of the capability (MigrationCapability_str).
    instances:
      mapped_ram_so_far:
        value: name == "mapped-ram" or (index > 0 and _parent.names[index - 1].mapped_ram_so_far.as<bool>)
        doc: '"mapped-ram" is this name or one before it.'
      ignore_shared_so_far:
        value: name == "x-ignore-shared" or (index > 0 and _parent.names[index - 1].ignore_shared_so_far.as<bool>)
        doc: '"x-ignore-shared" is this name or one before it.'

  vm_uuid:
    doc: The VM's UUID, when validate-uuid is on.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: uuid
        size: 16
        -orig-id: uuid
        doc: The UUID bytes.

  section_header_full:
    doc: Header of a START or FULL section (save_section_header).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: section_id
        type: u4
        -orig-id: se->section_id
        doc: SaveStateEntry.section_id; later PART/END sections and the footer repeat it.
      - id: len_idstr
        type: u1
        doc: Length of idstr.
      - id: idstr
        type: str
        size: len_idstr
        encoding: ASCII
        -orig-id: se->idstr
        doc: The device name, "ram" for RAM.
      - id: instance_id
        type: u4
        -orig-id: se->instance_id
        doc: Instance of the device.
      - id: version_id
        type: u4
        -orig-id: se->version_id
        doc: Version of its state; 4 for RAM.

  section_header_part:
    doc: Header of a PART or END section (save_section_header).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: section_id
        type: u4
        -orig-id: se->section_id
        doc: The id given in the section's START.

  section_footer:
    doc: The byte that closes a section and the id of that section (save_section_footer).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: marker
        contents: [0x7e]
        -orig-id: QEMU_VM_SECTION_FOOTER
        doc: Opens the footer.
      - id: section_id
        type: u4
        -orig-id: se->section_id
        doc: Must equal the section's id.

  command:
    doc: A command (qemu_savevm_command_send); QEMU 10.0 sends SWITCHOVER_START.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/savevm.c
    seq:
      - id: cmd
        type: u2
        enum: vm_command
        -orig-id: command
        doc: MIG_CMD_* (enum qemu_vm_cmd).
      - id: len_data
        type: u2
        -orig-id: len
        doc: Length of the data.
      - id: data
        size: len_data
        -orig-id: data
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
        doc: Total RAM bytes (ram_bytes_total_with_ignored) with RAM_SAVE_FLAG_MEM_SIZE in the low bits.
      - id: blocks
        type: ram_block(_index, _io.pos)
        repeat: until
        repeat-until: not _.has_next
        doc: |
          The RAMBlocks. Each entry is read at the offset where the one before it ends
          (`resume_pos`), so the list stays flat although the entries lie 1 MiB+ apart
          under mapped-ram: a block takes no bytes here, its fields are instances.
    instances:
      mem_size:
        value: mem_size_word - mem_size_word % 4096
        doc: Sum of the blocks' used_length (arithmetic, not a mask, for JavaScript's 32-bit `&`).
      mem_size_flags:
        value: mem_size_word % 4096
        enum: ram_flags
        doc: Must be MEM_SIZE.
      list_end:
        value: blocks.last.resume_pos
        doc: Where the stream resumes after the whole list (EOS of the RAM START section).

  ram_block:
    doc: |
      One RAMBlock in the block list, with its MappedRamHeader under mapped-ram. Its
      fields are instances at `entry_pos`, the end of the previous entry (or of its pages).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    -orig-id: RAMBlock
    params:
      - id: index
        type: s4
        doc: Place in the list.
      - id: list_pos
        type: u8
        doc: File offset of the first entry, after the MEM_SIZE word.
    instances:
      prev:
        value: _parent.blocks[index - 1]
        if: index > 0
        doc: The block before this one.
      entry_pos:
        value: 'index == 0 ? list_pos : prev.resume_pos.as<u8>'
        doc: File offset of this entry.
      remaining:
        value: 'index == 0 ? _parent.mem_size : prev.remaining.as<u8> - prev.used_length'
        doc: MEM_SIZE minus the lengths of the blocks before this one.
      len_idstr:
        pos: entry_pos
        type: u1
        doc: Length of the block name.
      idstr:
        pos: entry_pos + 1
        size: len_idstr
        type: str
        encoding: ASCII
        -orig-id: block->idstr
        doc: The RAMBlock name, e.g. "pc.ram".
      used_length:
        pos: entry_pos + 1 + len_idstr
        type: u8
        -orig-id: block->used_length
        doc: Bytes of RAM in the block.
      addr:
        pos: entry_pos + 9 + len_idstr
        type: u8
        if: _parent.ignore_shared
        -orig-id: block->mr->addr
        doc: The block's guest-physical address (x-ignore-shared only).
      mapped_ram_header:
        pos: 'entry_pos + 9 + len_idstr + (_parent.ignore_shared ? 8 : 0)'
        type: mapped_ram_header
        if: _parent.mapped_ram
        doc: Where the bitmap and the pages are.
      entry_size:
        value: '1 + len_idstr + 8 + (_parent.ignore_shared ? 8 : 0) + (_parent.mapped_ram ? 28 : 0)'
        doc: Bytes of this entry in the stream.
      resume_pos:
        value: '_parent.mapped_ram ? mapped_ram_header.pages_offset + used_length : entry_pos + entry_size'
        doc: Where QEMU reads on after this block.
      has_next:
        value: remaining > used_length and resume_pos > entry_pos
        doc: More blocks follow until MEM_SIZE is reached (a list running backwards ends).
      num_pages:
        value: '_parent.mapped_ram ? used_length / mapped_ram_header.page_size : 0'
        doc: Pages in the block.
      bitmap_size:
        value: (num_pages + 63) / 64 * 8
        doc: BITS_TO_LONGS(num_pages) * sizeof(unsigned long) on a 64-bit host.
      bitmap:
        pos: mapped_ram_header.bitmap_offset
        size: bitmap_size
        if: _parent.mapped_ram
        -orig-id: block->file_bmap
        doc: One bit a page, set when the page is in the file; host-order 64-bit words.
      pages:
        pos: mapped_ram_header.pages_offset
        size: used_length
        if: _parent.mapped_ram
        doc: Page N at N * page_size; slots of clear bits are zero or stale.

  mapped_ram_header:
    doc: MappedRamHeader, 28 bytes packed, big-endian (mapped_ram_setup_ramblock).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    -orig-id: MappedRamHeader
    seq:
      - id: version
        type: u4
        -orig-id: version
        doc: MAPPED_RAM_HDR_VERSION, 1.
      - id: page_size
        type: u8
        -orig-id: page_size
        doc: The target page size (4096 on x86, 8192 on sparc64).
      - id: bitmap_offset
        type: u8
        -orig-id: bitmap_offset
        doc: Absolute file offset of the block's bitmap.
      - id: pages_offset
        type: u8
        -orig-id: pages_offset
        doc: Absolute file offset of page 0; 1 MiB-aligned by QEMU.

  ram_records:
    doc: RAM words until EOS; under mapped-ram only EOS, in a classic stream also pages.
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    params:
      - id: page_size
        type: u4
        doc: Bytes of a PAGE record's page (TARGET_PAGE_SIZE).
    seq:
      - id: records
        type: ram_record(page_size)
        repeat: until
        repeat-until: (_.word & 0x10) != 0
        doc: Records; the last one carries RAM_SAVE_FLAG_EOS.

  ram_record:
    doc: One be64 word (page address | RAM_SAVE_FLAG_*) and what follows it (save_page_header).
    doc-ref: https://gitlab.com/qemu-project/qemu/-/blob/master/migration/ram.c
    params:
      - id: page_size
        type: u4
        doc: Bytes of the page after a PAGE word.
    seq:
      - id: word
        type: u8
        -orig-id: addr
        doc: Page-aligned offset in the block, flags in the bits below the page size.
      - id: len_idstr
        type: u1
        if: has_name
        doc: Length of the block name (absent with CONTINUE).
      - id: idstr
        type: str
        size: len_idstr
        encoding: ASCII
        if: has_name
        -orig-id: block->idstr
        doc: The block the page belongs to.
      - id: page
        size: page_size
        if: (word & 0x08) != 0
        doc: The page (RAM_SAVE_FLAG_PAGE), TARGET_PAGE_SIZE bytes.
      - id: fill
        type: u1
        if: (word & 0x02) != 0
        -orig-id: ch
        doc: The fill byte of a zero page (RAM_SAVE_FLAG_ZERO), 0.
    instances:
      flags:
        value: word % 4096
        enum: ram_flags
        doc: RAM_SAVE_FLAG_* bits.
      addr:
        value: word - word % page_size
        doc: Offset of the page in its block.
      has_name:
        value: '(word & 0x0a) != 0 and (word & 0x20) == 0'
        doc: PAGE or ZERO without CONTINUE names its block.

enums:
  section_type:
    0x00:
      id: eof
      -orig-id: QEMU_VM_EOF
    0x01:
      id: section_start
      -orig-id: QEMU_VM_SECTION_START
    0x02:
      id: section_part
      -orig-id: QEMU_VM_SECTION_PART
    0x03:
      id: section_end
      -orig-id: QEMU_VM_SECTION_END
    0x04:
      id: section_full
      -orig-id: QEMU_VM_SECTION_FULL
    0x05:
      id: subsection
      -orig-id: QEMU_VM_SUBSECTION
    0x06:
      id: vmdescription
      -orig-id: QEMU_VM_VMDESCRIPTION
    0x07:
      id: configuration
      -orig-id: QEMU_VM_CONFIGURATION
    0x08:
      id: command
      -orig-id: QEMU_VM_COMMAND
    0x7e:
      id: section_footer
      -orig-id: QEMU_VM_SECTION_FOOTER
  vm_command:
    0:
      id: invalid
      -orig-id: MIG_CMD_INVALID
    1:
      id: open_return_path
      -orig-id: MIG_CMD_OPEN_RETURN_PATH
    2:
      id: ping
      -orig-id: MIG_CMD_PING
    3:
      id: postcopy_advise
      -orig-id: MIG_CMD_POSTCOPY_ADVISE
    4:
      id: postcopy_listen
      -orig-id: MIG_CMD_POSTCOPY_LISTEN
    5:
      id: postcopy_run
      -orig-id: MIG_CMD_POSTCOPY_RUN
    6:
      id: postcopy_ram_discard
      -orig-id: MIG_CMD_POSTCOPY_RAM_DISCARD
    7:
      id: packaged
      -orig-id: MIG_CMD_PACKAGED
    8:
      id: enable_colo
      -orig-id: MIG_CMD_ENABLE_COLO
    9:
      id: postcopy_resume
      -orig-id: MIG_CMD_POSTCOPY_RESUME
    10:
      id: recv_bitmap
      -orig-id: MIG_CMD_RECV_BITMAP
    11:
      id: switchover_start
      -orig-id: MIG_CMD_SWITCHOVER_START
  ram_flags:
    0x01:
      id: full
      -orig-id: RAM_SAVE_FLAG_FULL
    0x02:
      id: zero
      -orig-id: RAM_SAVE_FLAG_ZERO
    0x04:
      id: mem_size
      -orig-id: RAM_SAVE_FLAG_MEM_SIZE
    0x08:
      id: page
      -orig-id: RAM_SAVE_FLAG_PAGE
    0x10:
      id: eos
      -orig-id: RAM_SAVE_FLAG_EOS
    0x20:
      id: continued
      -orig-id: RAM_SAVE_FLAG_CONTINUE
    0x40:
      id: xbzrle
      -orig-id: RAM_SAVE_FLAG_XBZRLE
    0x80:
      id: hook
      -orig-id: RAM_SAVE_FLAG_HOOK
    0x100:
      id: compress_page
      -orig-id: RAM_SAVE_FLAG_COMPRESS_PAGE
    0x200:
      id: multifd_flush
      -orig-id: RAM_SAVE_FLAG_MULTIFD_FLUSH
  libvirt_format:
    0:
      id: raw
      -orig-id: QEMU_SAVE_FORMAT_RAW
    1:
      id: gzip
      -orig-id: QEMU_SAVE_FORMAT_GZIP
    2:
      id: bzip2
      -orig-id: QEMU_SAVE_FORMAT_BZIP2
    3:
      id: xz
      -orig-id: QEMU_SAVE_FORMAT_XZ
    4:
      id: lzop
      -orig-id: QEMU_SAVE_FORMAT_LZOP
    5:
      id: zstd
      -orig-id: QEMU_SAVE_FORMAT_ZSTD
    6:
      id: sparse
      -orig-id: QEMU_SAVE_FORMAT_SPARSE
