# Data-loading tests (IDX reader, Fashion-MNIST, batches): they need the trident::io component
# (zlib). The real Fashion-MNIST files come from Debian's dataset-fashion-mnist
# (scripts/install-deps.sh) or the directory in TRIDENT_FASHION_MNIST_DIR; the tests that need
# them say so and skip when they are absent.
if(TARGET trident::io)
  trident_add_test(trident_io_tests SOURCES test_io.cpp test_char_text.cpp LABELS io TIMEOUT 120)
  target_link_libraries(trident_io_tests PRIVATE trident::io)
  # The character-level text tests also read tinyshakespeare (nanoGPT's shakespeare_char corpus):
  # $TRIDENT_TINYSHAKESPEARE at run time, else this file; they skip when it is absent.
  set(TRIDENT_TINYSHAKESPEARE "${PROJECT_SOURCE_DIR}/../shared/data/tinyshakespeare.txt"
      CACHE FILEPATH "tinyshakespeare.txt for trident_io_tests (skipped when absent)")
  target_compile_definitions(trident_io_tests PRIVATE TRIDENT_TINYSHAKESPEARE_PATH="${TRIDENT_TINYSHAKESPEARE}")
else()
  message(WARNING "tests: zlib not found, trident_io_tests is not built (run scripts/install-deps.sh)")
endif()
