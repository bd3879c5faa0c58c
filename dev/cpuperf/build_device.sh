#!/usr/bin/env bash
# Builds build-dev/difformer (and build-dev/difformer_tests with TESTS=1) on the device host from
# the carried .devdeps (no cmake deps there).
set -e
D=$PWD/.devdeps; O=/tmp/o_$$; mkdir -p $O build-dev
ls src/core/*.cpp src/ops/ref/*.cpp src/ops/cpu/*.cpp src/model/*.cpp src/train/*.cpp src/data/*.cpp src/io/*.cpp \
   src/ops/cuda_stub.cpp cli/*.cpp > $O/srcs
if [ "${TESTS:-0}" = 1 ]; then ls tests/*.cpp | grep -v test_cuda.cpp >> $O/srcs; fi
t0=$(date +%s)
F="-std=c++20 -O3 -march=native -DNDEBUG -fopenmp -w -Isrc -I. -Iinclude -Itests -I$D/include -I$D/include/eigen3 -DDIFFORMER_SOURCE_DIR=\"$PWD\" -DDIFFORMER_CLI=\"$PWD/build-dev/difformer\""
export F O
xargs -P $(nproc) -I{} sh -c 'g++ $F -c {} -o $O/$(echo {} | tr / _).o' < $O/srcs
g++ -fopenmp $(ls $O/*.o | grep -v tests_) $D/lib/libzip.so.4 $D/lib/libz.so.1 -o build-dev/difformer
if [ "${TESTS:-0}" = 1 ]; then
  g++ -fopenmp $(ls $O/*.o | grep -v cli_) $D/lib/libgtest_main.a $D/lib/libgtest.a $D/lib/libzip.so.4 $D/lib/libz.so.1 -lpthread -o build-dev/difformer_tests
fi
echo "built in $(( $(date +%s) - t0 )) s"
